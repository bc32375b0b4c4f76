#!/usr/bin/env bash
# Builds warden-test/busybox: a rootfs holding Debian's busybox-static, imported into
# Docker (no registry needed). It serves /www on port 80, a page naming the container.
set -euo pipefail
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/www" "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for app in sh httpd echo mkdir sleep cat ls wget; do ln -s busybox "$root/bin/$app"; done
tar -C "$root" -c . | docker import \
  -c 'EXPOSE 80' \
  -c 'ENV PATH=/bin' \
  -c 'CMD ["/bin/sh", "-c", "echo \"$NAME\" > /www/index.html && exec httpd -f -p 80 -h /www"]' \
  - warden-test/busybox >/dev/null
echo "built warden-test/busybox"
