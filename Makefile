# Two commands on a fresh machine: `make dev` starts the stack, `make test` runs the tests.
# Each installs what it needs into .venv first (Python 3.11+ with venv is all it assumes).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install dev test faults lint format clean \
	container-tools container-image container-up container-down container-test

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

dev: install
	$(BIN)/moderation dev

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

faults: install
	$(BIN)/python -m pytest -m faults tests/faults $(PYTEST_ARGS)

# ---- containers: the image and the compose stack, on podman with local stand-in base images
# (a machine with Docker and a registry runs `docker compose up -d --build` instead).
# OFFLINE_KIT: the offline container kit (installs podman, buildah, podman-compose and builds
# stand-ins for python:3.11-slim, postgres:16, a Kafka broker and nginx). Needs root.
OFFLINE_KIT ?= ../shared/containers
APP_IMAGE   ?= localhost/ad-moderation:dev
COMPOSE      = APP_IMAGE=$(APP_IMAGE) podman-compose -f docker-compose.yml -f compose.offline.yml
GATEWAY_PORT ?= 8000

container-tools:
	@test -x $(OFFLINE_KIT)/offline-images.sh || { \
		echo "error: no offline container kit at $(OFFLINE_KIT) (set OFFLINE_KIT)" >&2; exit 1; }
	$(OFFLINE_KIT)/offline-images.sh

container-image: container-tools
	$(OFFLINE_KIT)/offline-build.sh --from localhost/offline/python:3.11-slim -t $(APP_IMAGE) .

# Builds what is needed and returns once every service is healthy (one-shots done).
container-up: container-image
	GATEWAY_PORT=$(GATEWAY_PORT) $(COMPOSE) up -d
	deploy/compose-wait-healthy.sh ad-moderation 240

container-down:
	$(COMPOSE) down -v

# Up, the smoke tests through the gateway, down (also when a step fails).
container-test: install
	@status=0; \
	$(MAKE) container-up || status=$$?; \
	if [ $$status -eq 0 ]; then \
		GATEWAY_URL=http://127.0.0.1:$(GATEWAY_PORT) APP_IMAGE=$(APP_IMAGE) \
			$(BIN)/python -m pytest -m containers tests/containers $(PYTEST_ARGS) || status=$$?; \
	fi; \
	$(MAKE) container-down || true; \
	exit $$status

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/bandit --quiet --recursive --severity-level medium shared moderation model_export functions

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
