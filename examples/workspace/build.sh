#!/bin/sh
# examples/workspace/build.sh: builds everything the workspace example needs,
# offline, from Debian's busybox-static:
#
#   OUT/layers/supervisor.tar.gz   the supervisor layer (a .tar.gz file layer):
#                                  /.supervisor/bin/busybox (static) and
#                                  /.supervisor/supervisor (a script run by it)
#   OUT/images                     an OCI layout with two images:
#     app    the user's base image: a busybox rootfs plus /app/hello.txt
#     ide    the IDE image: layer 1 its own busybox rootfs (dropped by skip = 1),
#            layer 2 /ide (bin/code, bin/remote-cli/open, version.txt); its
#            config carries Gitpod's env modifiers (GITPOD_ENV_*)
#
# Usage:
#   examples/workspace/build.sh [OUT]             build (OUT defaults to this folder)
#   examples/workspace/build.sh [OUT] push HOST   build, then push app and ide to
#                                                 HOST (e.g. 127.0.0.1:5001) as
#                                                 acme/app:1.0 and acme/ide:1.2
# `make example-layers` runs the first form. Output is reproducible: the tar
# files have sorted names, mtime 0 and root ownership, gzip stores no name or
# time, so the supervisor layer's digest is the same on every machine with the
# same busybox-static.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE}
BUSYBOX=${BUSYBOX:-/bin/busybox}

need() { command -v "$1" >/dev/null 2>&1 || { echo "build.sh: $1 is needed ($2)" >&2; exit 1; }; }
need tar "tar"
need gzip "gzip"
need umoci "apt-get install umoci"
[ -x "$BUSYBOX" ] || { echo "build.sh: $BUSYBOX is missing (apt-get install busybox-static)" >&2; exit 1; }

mkdir -p "$OUT/layers"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rf-workspace.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM

# A reproducible tar (.tar.gz) of the contents of folder $1 into $2.
reproducible_tar_gz() {
    (cd "$1" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        --format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        -cf - .) | gzip -n -9 > "$2.tmp"
    mv "$2.tmp" "$2"
}

# ---- the supervisor layer ----
S="$WORK/supervisor"
mkdir -p "$S/.supervisor/bin"
cp "$BUSYBOX" "$S/.supervisor/bin/busybox"
chmod 0755 "$S/.supervisor/bin/busybox"
cat > "$S/.supervisor/supervisor" <<'SH'
#!/.supervisor/bin/busybox sh
# The workspace supervisor (a stand-in): it needs nothing from the base image.
echo "supervisor: workspace ready (PATH=$PATH)"
SH
chmod 0755 "$S/.supervisor/supervisor"
reproducible_tar_gz "$S" "$OUT/layers/supervisor.tar.gz"
echo "built $OUT/layers/supervisor.tar.gz"

# ---- the images (umoci) ----
L="$OUT/images"
rm -rf "$L"
umoci init --layout "$L"

rootfs() { # a busybox rootfs in folder $1
    mkdir -p "$1/bin" "$1/etc" "$1/tmp"
    cp "$BUSYBOX" "$1/bin/busybox"
    chmod 0755 "$1/bin/busybox"
    for a in sh cat echo ls env; do ln -sf busybox "$1/bin/$a"; done
    chmod 1777 "$1/tmp"
}
BASE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# app: the user's image.
rootfs "$WORK/app-rootfs"
mkdir -p "$WORK/app"
echo "hello from the user's app image" > "$WORK/app/hello.txt"
umoci new --image "$L:app"
umoci insert --image "$L:app" --history.created_by "COPY rootfs /" "$WORK/app-rootfs" /
umoci insert --image "$L:app" --history.created_by "COPY app /app" "$WORK/app" /app
umoci config --image "$L:app" --config.env "PATH=$BASE_PATH" --config.cmd /bin/sh \
    --config.workingdir /app --architecture amd64 --os linux --history.created_by "CMD /bin/sh"

# ide: the IDE image.
rootfs "$WORK/ide-rootfs"
mkdir -p "$WORK/ide/bin/remote-cli"
cat > "$WORK/ide/bin/code" <<'SH'
#!/bin/sh
echo "ide: code 1.2 (EDITOR=$EDITOR)"
SH
cat > "$WORK/ide/bin/remote-cli/open" <<'SH'
#!/bin/sh
echo "ide: open $*"
SH
chmod 0755 "$WORK/ide/bin/code" "$WORK/ide/bin/remote-cli/open"
echo "ide 1.2" > "$WORK/ide/version.txt"
umoci new --image "$L:ide"
umoci insert --image "$L:ide" --history.created_by "COPY rootfs /" "$WORK/ide-rootfs" /
umoci insert --image "$L:ide" --history.created_by "COPY ide /ide" "$WORK/ide" /ide
umoci config --image "$L:ide" --config.env "PATH=$BASE_PATH" \
    --config.env "GITPOD_ENV_SET_EDITOR=/ide/bin/code" \
    --config.env "GITPOD_ENV_PREPEND_PATH=/ide/bin/remote-cli:" \
    --architecture amd64 --os linux --history.created_by "ENV GITPOD_ENV_*"
umoci gc --layout "$L"
echo "built $L (tags app, ide)"

if [ "${2:-}" = "push" ]; then
    HOST=${3:?build.sh: push needs HOST, e.g. 127.0.0.1:5001}
    need skopeo "apt-get install skopeo"
    skopeo copy --quiet --dest-tls-verify=false "oci:$L:app" "docker://$HOST/acme/app:1.0"
    skopeo copy --quiet --dest-tls-verify=false "oci:$L:ide" "docker://$HOST/acme/ide:1.2"
    echo "pushed $HOST/acme/app:1.0 and $HOST/acme/ide:1.2"
fi
