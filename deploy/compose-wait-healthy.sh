#!/usr/bin/env bash
# compose-wait-healthy.sh [PROJECT] [TIMEOUT_SECONDS]
# Returns once every container of the compose project is healthy (those with a health check),
# running (those without) or exited 0 (one-shot jobs). Fails naming the first container that
# exited non-zero, or those still unhealthy at the deadline, with the end of their logs.
# podman without systemd never runs health checks by itself: they are run here.
set -euo pipefail
project="${1:-ad-moderation}"
timeout="${2:-180}"
engine="${CONTAINER_ENGINE:-podman}"
deadline=$((SECONDS + timeout))

show_logs() { for c in "$@"; do echo "--- $c (last lines)"; "$engine" logs --tail 15 "$c" 2>&1 || true; done; }

while :; do
    waiting=()
    mapfile -t containers < <("$engine" ps -a --filter "label=io.podman.compose.project=$project" --format '{{.Names}}')
    [ "${#containers[@]}" -gt 0 ] || { echo "error: no containers of project $project" >&2; exit 1; }
    for c in "${containers[@]}"; do
        read -r status code health < <("$engine" inspect -f '{{.State.Status}} {{.State.ExitCode}} {{if .Config.Healthcheck}}check{{else}}none{{end}}' "$c")
        case "$status" in
            exited|stopped)
                if [ "$code" = 0 ]; then continue; fi
                echo "error: $c exited with code $code" >&2; show_logs "$c" >&2; exit 1 ;;
            running)
                if [ "$health" = none ] || "$engine" healthcheck run "$c" >/dev/null 2>&1; then continue; fi ;;
        esac
        waiting+=("$c")
    done
    if [ "${#waiting[@]}" -eq 0 ]; then
        echo "all ${#containers[@]} containers of $project are healthy or done"
        exit 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "error: not healthy after ${timeout}s: ${waiting[*]}" >&2; show_logs "${waiting[@]}" >&2; exit 1
    fi
    sleep 2
done
