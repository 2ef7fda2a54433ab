#!/bin/sh
# Start python-matter-server 7.0.1 inside network namespace NS with every hard-coded CHIP path redirected into
# RUN_DIR, using a private mount namespace:
#   RUN_DIR        -> /data   (CHIP writes /data/chip_factory.ini, chip_config.ini, chip_counters.ini)
#   RUN_DIR/tmp    -> /tmp    (CHIP writes /tmp/chip_kvs via temp file + rename, so a file bind-mount won't do)
#   RUN_DIR/server    python-matter-server --storage-path (chip.json, <fabric>.json)
#   RUN_DIR/paa       --paa-root-cert-dir: the test PAA certs + a fresh .version (else it deletes them / downloads)
# usage: run-matter-server.sh NS RUN_DIR PAA_SRC_DIR [extra matter-server args, e.g. --port 5580 ...]
# The host needs an (empty) /data directory as mount point; this script creates it.
set -eu
NS=$1; RUN=$(realpath -m "$2"); PAA_SRC=$(realpath "$3"); shift 3
VENV=${MATTER_VENV:-$(dirname "$(realpath "$0")")/venv}
mkdir -p /data "$RUN/server" "$RUN/paa" "$RUN/tmp"
cp "$PAA_SRC"/*.der "$RUN/paa/"
touch "$RUN/paa/.version"   # mtime < 24 h -> "Skip fetching certificates"
exec ip netns exec "$NS" unshare --mount --propagation private -- sh -c '
    set -e
    mount --bind "$0" /data
    mount --bind /data/tmp /tmp
    venv=$1; shift
    exec "$venv/bin/matter-server" --storage-path /data/server --paa-root-cert-dir /data/paa \
        --log-level info --log-level-sdk error "$@"
' "$RUN" "$VENV" "$@"
