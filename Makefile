# The two commands a new user needs (see README):
#   make demo   set up everything, then run the demo study on the embedded local stack, in a container of the
#               pinned study image; its receipt is verified with `seal verify --rebuild` of this checkout
#   make test   set up everything, then run the whole test suite (forge + pytest)
.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/seal demo --backend container

test: setup
	cd contracts && ../tools/node_modules/.bin/forge test --offline
	.venv/bin/pytest

bench: setup
	@bash scripts/bench-setup.sh
	.venv/bin/python -m bench

clean:
	rm -rf .venv tools/node_modules contracts/out contracts/cache .sealroom
