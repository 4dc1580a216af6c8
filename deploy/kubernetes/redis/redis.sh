#!/bin/sh
# The limits store (redis-server) with its password read from a file, so the password is
# never on a command line (`ps`) nor in an environment variable; and its health check.
#
#   redis.sh run PASSWORD_FILE [OPTION…]   exec redis-server with `requirepass` read from
#                                          PASSWORD_FILE and the redis-server OPTIONs
#   redis.sh ping HOST:PORT PASSWORD_FILE  exit 0 iff redis-server answers PONG to an
#                                          authenticated PING (redis-cli exits 0 on NOAUTH)
#
# The password: 16 to 512 characters of A-Z a-z 0-9 . _ ~ + / = - (`openssl rand -hex 32`),
# so it needs no quoting in Redis's configuration syntax. Compose and Kubernetes both run
# this script from the official redis image (busybox or dash sh, redis-cli on PATH).
set -eu

usage() {
    sed -n '5,9p' "$0" >&2
    exit 2
}

password() {
    [ -r "$1" ] || { echo "redis.sh: cannot read the password file $1" >&2; exit 1; }
    password=$(cat "$1")
    case "$password" in
        *[!A-Za-z0-9._~+/=-]*) echo "redis.sh: $1: characters outside A-Z a-z 0-9 . _ ~ + / = -" >&2; exit 1 ;;
    esac
    if [ "${#password}" -lt 16 ] || [ "${#password}" -gt 512 ]; then
        echo "redis.sh: $1: expected 16 to 512 characters, found ${#password}" >&2
        exit 1
    fi
}

[ $# -ge 2 ] || usage
command=$1
shift
case "$command" in
    run)
        password "$1"
        shift
        # `-` reads the configuration from stdin (a here-document: no file is written).
        exec redis-server - "$@" <<END
requirepass $password
END
        ;;
    ping)
        [ $# -eq 2 ] || usage
        password "$2"
        reply=$(REDISCLI_AUTH=$password redis-cli -h "${1%:*}" -p "${1##*:}" ping 2>&1) || true
        [ "$reply" = PONG ] || { echo "redis.sh: $reply" >&2; exit 1; }
        ;;
    *) usage ;;
esac
