.PHONY: install repro test bench
install:
	./tools/install.sh
repro: install
	. .venv/bin/activate && dvc repro
test: install
	.venv/bin/python -m pytest
