#!/usr/bin/env bash
# Packs Debian's busybox-static into a one-layer OCI image for this machine's platform and
# pushes it to a registry over plain HTTP, with the distribution API and curl alone:
#   scripts/push-busybox.sh 127.0.0.1:5000 baton/busybox:1
# A tiny Linux image for trying OCI containers beside components without Docker.
set -euo pipefail
REGISTRY="${1:?usage: push-busybox.sh REGISTRY NAME:TAG}"
REF="${2:?usage: push-busybox.sh REGISTRY NAME:TAG}"
NAME="${REF%%:*}"
TAG="${REF##*:}"
case "$(uname -m)" in
  x86_64) ARCH=amd64 ;;
  aarch64) ARCH=arm64 ;;
  *) ARCH="$(uname -m)" ;;
esac
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$WORK/rootfs/bin" "$WORK/rootfs/tmp"
chmod 1777 "$WORK/rootfs/tmp"
cp /bin/busybox "$WORK/rootfs/bin/busybox"
for applet in sh echo cat sleep ls wget httpd nc id hostname env grep true; do
  ln -s busybox "$WORK/rootfs/bin/$applet"
done
tar --numeric-owner --owner=0 --group=0 -C "$WORK/rootfs" -czf "$WORK/layer.tar.gz" .
LAYER="sha256:$(sha256sum "$WORK/layer.tar.gz" | cut -d' ' -f1)"
LAYER_SIZE="$(stat -c %s "$WORK/layer.tar.gz")"
printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$ARCH" "$(gunzip -c "$WORK/layer.tar.gz" | sha256sum | cut -d' ' -f1)" >"$WORK/config.json"
CONFIG="sha256:$(sha256sum "$WORK/config.json" | cut -d' ' -f1)"
CONFIG_SIZE="$(stat -c %s "$WORK/config.json")"

# A monolithic upload: POST for a session, PUT the blob with its digest.
push_blob() {
  local file="$1" digest="$2" location
  location="$(curl -sSf -X POST -D - -o /dev/null "http://$REGISTRY/v2/$NAME/blobs/uploads/" |
    tr -d '\r' | sed -n 's/^[Ll]ocation: //p')"
  case "$location" in http*) ;; *) location="http://$REGISTRY$location" ;; esac
  case "$location" in *\?*) location="$location&digest=$digest" ;; *) location="$location?digest=$digest" ;; esac
  curl -sSf -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$file" "$location" >/dev/null
}
push_blob "$WORK/layer.tar.gz" "$LAYER"
push_blob "$WORK/config.json" "$CONFIG"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%s}]}' \
  "$CONFIG" "$CONFIG_SIZE" "$LAYER" "$LAYER_SIZE" >"$WORK/manifest.json"
curl -sSf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
  --data-binary "@$WORK/manifest.json" "http://$REGISTRY/v2/$NAME/manifests/$TAG" >/dev/null
echo "pushed $REGISTRY/$REF (linux/$ARCH)"
