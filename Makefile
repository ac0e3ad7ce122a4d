# make demo  - train + evaluate the small Cascade R-CNN with the equal-CPU-time recipe on the synthetic defects
#              (CPU, ~10 min; DEMO_CONFIG=configs/synthetic/cascade_r18_cpu.yaml for the plain model)
# make test  - the test suite (CPU)
# Both create/refresh the virtualenv first (bootstrap.sh; seconds when up to date).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= output/demo
DEMO_CONFIG ?= configs/synthetic/recipe_r18_cpu.yaml

.PHONY: bootstrap demo test bench

bootstrap:
	@VENV=$(VENV) bash bootstrap.sh

demo: bootstrap
	$(PY) datasets/prepare_synthetic_defects.py --if-missing
	$(PY) train_net.py --config-file $(DEMO_CONFIG) --resume OUTPUT_DIR $(DEMO_DIR)
	$(PY) tools/visualize_results.py --dataset synthetic_defects_val \
	    --results $(DEMO_DIR)/inference/synthetic_defects_val/coco_instances_results.json \
	    --output $(DEMO_DIR)/predictions --num-images 8 --overwrite
	@echo "demo outputs in $(DEMO_DIR): eval_results.json, eval_tables.md, metrics.json, predictions/*.png"

test: bootstrap
	$(PY) -m pytest -q tests

bench: bootstrap
	$(PY) benchmarks/trainer.py
