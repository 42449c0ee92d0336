.PHONY: install repro test bench
install:
	./tools/install.sh
repro: install
	. .venv/bin/activate && dvc repro
test: install
	.venv/bin/python -m pytest -n 2 --dist loadfile   # two workers: CI has 2 cores, most tests use one thread
