#!/bin/bash
# Envoy's admin interface, from inside the official Envoy image (bash, no curl):
# the probes, and the drain that lets streaming responses finish before Envoy stops.
#
#   envoy-admin.sh ready ADMIN                exit 0 iff /ready answers 200 (Envoy is LIVE)
#   envoy-admin.sh alive ADMIN                exit 0 iff the admin interface answers at all
#   envoy-admin.sh drain ADMIN MIN MAX        drain the listeners gracefully, wait MIN seconds
#                                             (load balancers stop sending), then until no
#                                             request is in flight or MAX seconds have passed
#   envoy-admin.sh run ADMIN MIN MAX -- CMD…  run Envoy (CMD); on SIGTERM drain it, then stop it
#
# ADMIN is the gateway YAML's admin address as HOST:PORT (a loopback address: the
# admin interface is never exposed). Kubernetes runs `drain` as Envoy's preStop hook;
# compose, which has no hooks, wraps Envoy with `run`.
set -u

# request METHOD PATH: print the response body and set STATUS (empty if nothing
# answered); succeed iff the status is 200.
request() {
    local line
    STATUS=
    { exec 3<>"/dev/tcp/${ADMIN%:*}/${ADMIN##*:}"; } 2>/dev/null || return 1
    printf '%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' \
        "$1" "$2" "${ADMIN%:*}" >&3
    read -r -t 5 _ STATUS _ <&3
    while IFS= read -r -t 5 line <&3 && [ "$line" != $'\r' ]; do :; done  # the headers
    timeout 5 cat <&3
    exec 3<&-
    [ "$STATUS" = 200 ]
}

# The number of requests in flight on Envoy's own listeners (the admin's are left out).
in_flight() {
    request GET '/stats?filter=downstream_rq_active$' | tr -d '\r' |
        awk -F': ' '/^http\./ && !/^http\.admin\./ { n += $2 } END { print n + 0 }'
}

drain() {
    local min=$1 max=$2 deadline=$((SECONDS + $2))
    # Listeners stay open for Envoy's --drain-time-s, answering with `connection: close`
    # (HTTP/1.1) or GOAWAY (HTTP/2); streams in flight run on.
    request POST '/drain_listeners?graceful' >/dev/null || return 0  # Envoy has gone already
    echo "envoy-admin: draining (at least ${min}s, at most ${max}s)" >&2
    sleep "$min"
    while [ "$SECONDS" -lt "$deadline" ] && [ "$(in_flight)" -gt 0 ]; do
        sleep 1
    done
    echo "envoy-admin: drained, $(in_flight) request(s) still in flight" >&2
}

run() {
    local min=$1 max=$2 envoy status stopping=
    shift 3  # MIN MAX --
    trap 'stopping=1' TERM INT
    "$@" &
    envoy=$!
    while :; do
        wait "$envoy"
        status=$?
        if ! kill -0 "$envoy" 2>/dev/null; then
            return "$status"  # Envoy exited on its own (or after the drain below)
        fi
        if [ -n "$stopping" ]; then
            drain "$min" "$max"
            kill -TERM "$envoy"
        fi
    done
}

usage() {
    sed -n '5,10p' "$0" >&2
    exit 2
}

[ $# -ge 2 ] || usage
command=$1 ADMIN=$2
shift 2
case "$command" in
    ready) request GET /ready >/dev/null ;;
    alive) request GET /ready >/dev/null; [ -n "$STATUS" ] ;;  # 503 while starting or draining
    drain) [ $# -eq 2 ] || usage; drain "$1" "$2" ;;
    run) [ $# -ge 4 ] && [ "$3" = "--" ] || usage; run "$@" ;;
    *) usage ;;
esac
