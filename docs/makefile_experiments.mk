# Report experiments. Included by the Makefile (`include docs/makefile_experiments.mk`), which
# provides PY, DATA_ARGS, ARGS and the `install` target.
#
#   make <experiment> [SCALE=full|cpu|quick] [SEEDS=1,2,3] [ARGS="hydra overrides"]
#     runs `python run.py -m experiment=<experiment> scale=$(SCALE) seed=$(SEEDS) $(DATA_ARGS) $(ARGS)` through
#     `python -m imagenette_lab.report.sweep`, which records the command, machine and wall time in
#     logs/multiruns/<experiment>/<scale>/provenance.jsonl and renders $(RESULTS)/<scale>/<experiment>.md + PNGs
#     (also when a job failed: the page then lists it). Completed jobs are skipped on a rerun.
#   make report      renders every sweep found under logs/multiruns (no training) and $(RESULTS)/CLAIMS.md, every
#                    claim of the report with a verdict per scale (from those same sweeps: keep them on disk).
#   make claims      renders $(RESULTS)/CLAIMS.md only.
# SCALE: full = the report's 224 px recipe (GPU); cpu = the report's accuracy regime on 2 CPU cores (stand-in
# model, <= 20 min a run); quick = 32 px crops, 4 epochs (smoke scale).
# SEEDS: comma-separated, one job per seed and arm. RESULTS: artefacts go to $(RESULTS)/$(SCALE)/.
# (No comments after the values: make would keep the spaces before them.)
SCALE ?= full
SEEDS ?= 1,2,3
RESULTS ?= docs/results
# Every conf/experiment/*.yaml is a make target of its own (the file is the one definition; its
# `# make-help:` line is what `make help` prints); PRESETS are experiment files that are not sweeps.
PRESETS := cpu_train
EXPERIMENTS := $(filter-out $(PRESETS),$(sort $(basename $(notdir $(wildcard conf/experiment/*.yaml)))))

.PHONY: $(EXPERIMENTS) report claims readme

define run_experiment
$(PY) -m imagenette_lab.report.sweep $@ --scale $(SCALE) --seeds $(SEEDS) --out $(RESULTS) \
	--make 'make $@ SCALE=$(SCALE) SEEDS=$(SEEDS)$(if $(ARGS), ARGS="$(ARGS)")' -- $(DATA_ARGS) $(ARGS)
endef

$(EXPERIMENTS): install
	$(run_experiment)

experiments-help: ## One line per report experiment (make <experiment>), from each file's `# make-help:` line
	@for name in $(EXPERIMENTS); do printf "  \033[36m%-14s\033[0m %s\n" "$$name" \
	  "$$(sed -n 's/^# make-help: //p' conf/experiment/$$name.yaml)"; done

report: install ## Render every sweep under logs/multiruns -> $(RESULTS)/<scale>/<experiment>.md + CLAIMS.md
	$(PY) -m imagenette_lab.report logs/multiruns --out $(RESULTS) --claims

claims: install ## Render $(RESULTS)/CLAIMS.md (every claim of the report, a verdict per scale) from logs/multiruns
	$(PY) -m imagenette_lab.report logs/multiruns --out $(RESULTS) --claims-only

readme: install ## Regenerate README.md's experiments table from conf/experiment/*.yaml (a test checks it is current)
	$(PY) -m imagenette_lab.report.catalogue README.md
