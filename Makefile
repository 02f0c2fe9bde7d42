# Everything a fresh machine needs: `make run` (the whole workflow on the demo data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlprep-installed
CORES ?= all

.PHONY: run test bench lint report dry-run clean slurm-packages browser-packages

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt resemblyzer  # see pyproject.toml
	touch $@

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --report results/report.html

dry-run: $(STAMP)
	$(BIN)/snakemake -n

# SLURM for the cluster tests, from Debian's packages; only as root with apt (else those tests skip).
slurm-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then bash tests/cluster/slurm_cluster.sh install; \
	else echo "not root or no apt-get: SLURM not installed, the cluster tests will be skipped"; fi

# Chromium, in which the chaos suite opens the report (headless), from Debian's packages; only as root with apt.
browser-packages:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "not root or no apt-get: chromium not installed, the report's browser test will be skipped"; fi

test: $(STAMP) slurm-packages browser-packages
	$(BIN)/python -m pytest

# Every pipeline's benchmark, one table (printed, in results/bench/, and into docs/performance.md).
bench: $(STAMP)
	$(BIN)/python bench/table.py --readme

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check .

report: $(STAMP)
	$(BIN)/snakemake --report results/report.html

clean:
	rm -rf results .snakemake
