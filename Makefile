# tgr-bench. `make help` lists the targets with what each needs and roughly how long it runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tgr-bench-installed

# Paper reproduction settings (override on the command line: make table1 DATA=/data/tgr1000).
DATA ?= data/tgr1000/clean_resized_images
SOURCES ?= vit_base,pit_b,cait_s24,visformer_s
ATTACKS ?= mi,vmi,sgm,pna,tgr
RUNS ?= multirun
LAUNCHER ?=
ARGS ?=
# Folder of the converted TF-slim weights the paper's CNN and defended targets used
# (tf2torch_*.npy from github.com/ylhz/tf_to_pytorch_model, release v1.0). Without it, Table 2
# uses timm's ports where timm has them and shows n/a for Res-v2-101 and Inc-v3-ens3/4.
TF2TORCH ?=
SWEEP = $(BIN)/tgr-bench -m data.root=$(DATA) $(if $(TF2TORCH),tf2torch_dir=$(TF2TORCH)) $(LAUNCHER) $(ARGS)
REPORT = $(BIN)/tgr-bench-report

.PHONY: help install smoke test test-fast lint clean paper-runs table1 table2 table3 ablation-k \
	ablation-components cnn-source tricks successors defenses

help:  ## list the targets
	@echo "tgr-bench make targets (venv: $(VENV); paper data: DATA=$(DATA))"
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-20s %s\n", $$1, $$2}'
	@echo "Paper targets need a GPU, the 1000-image set (DATA=..., see README) and either network"
	@echo "for the timm weights or a filled Hugging Face cache. The CNN and defended columns of"
	@echo "Table 2 as the paper computed them need TF2TORCH=<folder of tf2torch_*.npy> (published"
	@echo "at github.com/ylhz/tf_to_pytorch_model, release v1.0); without it Res-v2-101 and"
	@echo "Inc-v3-ens3/4 read n/a and the other four use timm's ports. Times: one H100/A100, fp32."
	@echo "Runs resume: re-running a target finishes what is missing. LAUNCHER=hydra/launcher=slurm"
	@echo "sends every run to Slurm (conf/hydra/launcher/slurm.yaml)."

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install tgr-bench with its dev tools (CPU ok)

smoke: $(STAMP)  ## offline smoke run: tiny random-weight timm models, synthetic images (CPU, ~10 s)
	$(BIN)/tgr-bench experiment=smoke

test: $(STAMP)  ## lint and the whole test suite, both tiers (CPU, no network, under 6 min on 2 cores)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto

test-fast: $(STAMP)  ## the fast tier to run while working: no subprocesses, no test over a few seconds (under 2 min)
	$(BIN)/python -m pytest -q -n auto -m "not slow"

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

paper-runs: $(STAMP)  ## GPU+data: 4 sources x 5 attacks on all 15 targets, once for tables 1 and 2 (~1 h)
	$(SWEEP) source=$(SOURCES) attack=$(ATTACKS) targets=paper hydra.sweep.dir=$(RUNS)/paper

table1: paper-runs  ## GPU+data: Table 1, ViT targets -> results/table1/
	$(REPORT) $(RUNS)/paper --groups vits --out results/table1

table2: paper-runs  ## GPU+data(+TF2TORCH=dir): Table 2, CNN and defended targets -> results/table2/
	$(REPORT) $(RUNS)/paper --groups cnns,defended --out results/table2

table3: $(STAMP)  ## GPU+data: Table 3, PNA+PatchOut vs TGR+PatchOut, all targets (~20 min)
	$(SWEEP) source=$(SOURCES) attack=pna_patchout,tgr_patchout targets=paper hydra.sweep.dir=$(RUNS)/table3
	$(REPORT) $(RUNS)/table3 --out results/table3

ablation-k: $(STAMP)  ## GPU+data: TGR on vit_base, k = 1,2,4,8,16 -> plot and table (~10 min)
	$(SWEEP) source=vit_base attack=tgr attack.k=1,2,4,8,16 targets=paper hydra.sweep.dir=$(RUNS)/ablation_k
	$(REPORT) $(RUNS)/ablation_k --sweep k --out results/ablation_k

ablation-components: $(STAMP)  ## GPU+data: TGR on vit_base, every subset of attn/qkv/mlp -> bar chart (~15 min)
	$(SWEEP) source=vit_base attack=tgr 'attack.components=[attn],[qkv],[mlp],[attn,qkv],[attn,mlp],[qkv,mlp],[attn,qkv,mlp]' targets=paper hydra.sweep.dir=$(RUNS)/ablation_components
	$(REPORT) $(RUNS)/ablation_components --components --out results/ablation_components

.PHONY: table4
table4: $(STAMP)  ## GPU+data: Table 4, gradient variance per block of vit_base (mi, vmi, tgr, tgr_nozero) -> results/table4/ (~10 min)
	$(BIN)/tgr-bench-variance source=vit_base 'attacks=[mi,vmi,tgr,tgr_nozero]' data.root=$(DATA) $(ARGS) hydra.run.dir=$(RUNS)/table4
	mkdir -p results/table4
	cp $(RUNS)/table4/variance.{csv,md,tex,png,json} results/table4/

cnn-source: $(STAMP)  ## GPU+data+TF2TORCH: MI, SGM, TGR from CNN sources (TF-slim Res-v2-101, timm ResNet-50) to all targets -> results/cnn_source/ (~30 min)
	$(SWEEP) source=res_v2_101,res_50 attack=mi,sgm,tgr targets=paper hydra.sweep.dir=$(RUNS)/cnn_source
	$(REPORT) $(RUNS)/cnn_source --out results/cnn_source

tricks: $(STAMP)  ## GPU+data: MI, PNA, TGR on vit_base, alone, +DI, +TI, +DI+TI, all targets -> results/tricks/ (~1 h)
	$(SWEEP) source=vit_base attack=mi,pna,tgr attack.di.enabled=false,true attack.ti.enabled=false,true targets=paper hydra.sweep.dir=$(RUNS)/tricks
	$(REPORT) $(RUNS)/tricks --out results/tricks

SUCCESSORS ?= mi,tgr,att,gns,vdc,fpr,ll2s
DEFENSES ?= [jpeg,bit_depth,median,rp,pd]

successors: $(STAMP)  ## GPU+data: MI, TGR, ATT, GNS-HFA, VDC, FPR, LL2S from vit_base on the paper's targets, one table -> results/successors/
	$(SWEEP) source=vit_base attack=$(SUCCESSORS) targets=paper hydra.sweep.dir=$(RUNS)/successors
	$(REPORT) $(RUNS)/successors --out results/successors

defenses: $(STAMP)  ## GPU+data: the same attacks from vit_base on targets=transferattack, each input defense -> results/defenses/
	$(SWEEP) source=vit_base attack=$(SUCCESSORS) targets=transferattack 'defenses=$(DEFENSES)' hydra.sweep.dir=$(RUNS)/defenses
	$(REPORT) $(RUNS)/defenses --out results/defenses

clean:  ## remove run outputs (not .venv, not results/)
	rm -rf outputs multirun build dist *.egg-info
