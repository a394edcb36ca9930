# Report experiments. Included by the Makefile (`include docs/makefile_experiments.mk`), which
# provides PY, DATA_ARGS, ARGS and the `install` target.
#
#   make <experiment> [SCALE=full|quick] [SEEDS=1,2,3] [ARGS="hydra overrides"]
#     runs `python run.py -m experiment=<experiment> scale=$(SCALE) seed=$(SEEDS) $(DATA_ARGS) $(ARGS)` through
#     `python -m imagenette_lab.report.sweep`, which records the command, machine and wall time in
#     logs/multiruns/<experiment>/<scale>/provenance.jsonl and renders $(RESULTS)/<scale>/<experiment>.md + PNGs
#     (also when a job failed: the page then lists it). Completed jobs are skipped on a rerun.
#   make report      renders every sweep found under logs/multiruns (no training) and $(RESULTS)/CLAIMS.md, every
#                    claim of the report with a verdict per scale (from those same sweeps: keep them on disk).
#   make claims      renders $(RESULTS)/CLAIMS.md only.
# SCALE: full = the report's 224 px recipe (GPU); quick = 32 px crops, 4 epochs (2-core CPU).
# SEEDS: comma-separated, one job per seed and arm. RESULTS: artefacts go to $(RESULTS)/$(SCALE)/.
# (No comments after the values: make would keep the spaces before them.)
SCALE ?= full
SEEDS ?= 1,2,3
RESULTS ?= docs/results
EXPERIMENTS := architectures table1 dropout lr_schedule activation blurpool resize batch_size optimizer label_noise \
	dataset_size normalize

.PHONY: $(EXPERIMENTS) report claims

define run_experiment
$(PY) -m imagenette_lab.report.sweep $@ --scale $(SCALE) --seeds $(SEEDS) --out $(RESULTS) \
	--make 'make $@ SCALE=$(SCALE) SEEDS=$(SEEDS)$(if $(ARGS), ARGS="$(ARGS)")' -- $(DATA_ARGS) $(ARGS)
endef

architectures: install ## Sec. II: six architectures from scratch -> accuracy table + bars
	$(run_experiment)

table1: install ## Table 1 / Sec. IV.1: hybrid vs ResNet50 (lr 2.4e-4 and 1e-3) per class, report's beside ours
	$(run_experiment)

dropout: install ## Figure 1 / Sec. IV.3: dropout 0-0.5 x BatchNorm / none / none + zero-init -> curves
	$(run_experiment)

lr_schedule: install ## Sec. IV.4: ResNet50, constant lr 0.001 vs cosine (report: ~80% vs 87%)
	$(run_experiment)

activation: install ## Sec. IV.5: ReLU6 vs Mish -> accuracy and epochs/seconds to each accuracy
	$(run_experiment)

blurpool: install ## Sec. IV.5: BlurPool off vs on (report: BlurPool lowered accuracy)
	$(run_experiment)

resize: install ## Sec. III: resize 150-450 px, crop 0.8x -> accuracy vs resize (report chose 280)
	$(run_experiment)

batch_size: install ## Sec. III: batch 32/64/96/128 -> accuracy, epoch time, overfitting
	$(run_experiment)

optimizer: install ## Sec. III: Adam (lr 0.00024) vs SGD (lr 0.1, and 0.1 x batch/256)
	$(run_experiment)

label_noise: install ## Sec. IV.2: 0/5/50% of training labels replaced on purpose (report blames ~5% noise)
	$(run_experiment)

dataset_size: install ## Sec. IV.2: 25/50/75/100% of the training images (report blames dataset size)
	$(run_experiment)

normalize: install ## Sec. III: ImageNet mean/std vs the training split's own
	$(run_experiment)

report: install ## Render every sweep under logs/multiruns -> $(RESULTS)/<scale>/<experiment>.md + CLAIMS.md
	$(PY) -m imagenette_lab.report logs/multiruns --out $(RESULTS) --claims

claims: install ## Render $(RESULTS)/CLAIMS.md (every claim of the report, a verdict per scale) from logs/multiruns
	$(PY) -m imagenette_lab.report logs/multiruns --out $(RESULTS) --claims-only
