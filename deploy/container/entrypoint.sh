#!/bin/sh
# The image's entrypoint. With no command (or `serve`), serve the function FUNCTION_TARGET
# names on $PORT; any other command runs as given (`moderation adapter`, `moderation migrate`).
set -eu

# Metrics of the processes of an earlier start would be added to this one's: start empty.
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    rm -rf "$PROMETHEUS_MULTIPROC_DIR"
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
fi

# Several worker processes add up their metrics through files in PROMETHEUS_MULTIPROC_DIR; one
# process keeps them in memory (each update written to a file cost 2 µs of a ~80 µs /predict).
# The folder stays, for whatever else runs in the container.
if [ "${WORKERS:-1}" = 1 ]; then
    unset PROMETHEUS_MULTIPROC_DIR
fi

if [ "$#" -gt 0 ] && [ "$1" != serve ]; then
    exec "$@"
fi

functions="predict, async_predict, get_result, moderation_consumer"
if [ -z "${FUNCTION_TARGET:-}" ]; then
    echo "error: FUNCTION_TARGET is not set: name one of $functions" >&2
    exit 2
fi
source="${FUNCTION_SOURCE:-/app/functions/$FUNCTION_TARGET/main.py}"
if [ ! -f "$source" ]; then
    echo "error: FUNCTION_TARGET: no function named '$FUNCTION_TARGET' (one of $functions)" >&2
    exit 2
fi
exec functions-framework --target "$FUNCTION_TARGET" --source "$source" \
    --host "${HOST:-0.0.0.0}" --port "${PORT:-8080}"
