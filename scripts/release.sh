#!/usr/bin/env bash
# release.sh builds Lethe's release into DIST (default dist/): for each platform of PLATFORMS
# (default linux/amd64 linux/arm64) an archive lethe-VERSION-OS-ARCH.tar.gz (the binaries, the
# systemd units, the example configurations and the documentation), its CycloneDX SBOM and an
# OCI image layout per daemon; then SHA256SUMS and SHA256SUMS.sig, its Ed25519 signature.
#
# The build is reproducible: static binaries (CGO_ENABLED=0) built with -trimpath and the VCS
# revision recorded, every file of every archive and image dated SOURCE_DATE_EPOCH (by default
# the time of the last commit) and owned by 0:0. Two runs on one commit give the same bytes.
#
# The agent is built as it runs on a host (-tags lethe_noemulation, as `make
# agent-production`): it attests with SEV-SNP or TDX hardware only.
#
# LETHE_RELEASE_KEY names the signing key (PKCS #8 PEM; `lethectl keygen --name release`
# makes one) and LETHE_RELEASE_PUB its public key. Without them the release is signed with a
# development key, made once as bin/release-key/release.key, and the script says so. Check a
# release with
#   go run ./internal/cmd/lethe-release verify -key release.pub dist
# or, for the checksums alone, (cd dist && sha256sum -c SHA256SUMS).
set -euo pipefail
cd "$(dirname "$0")/.."

GO="${GO:-go}"
DIST="${DIST:-dist}"
PLATFORMS="${PLATFORMS:-linux/amd64 linux/arm64}"
CMDS="lethectl lethe-broker lethe-keybroker lethe-agent"
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
VERSION="${VERSION:-$(git describe --tags --always --dirty)}"
export SOURCE_DATE_EPOCH

say() { echo "release.sh: $*"; }

key="${LETHE_RELEASE_KEY:-}"
pub="${LETHE_RELEASE_PUB:-}"
if [ -z "$key" ]; then
	key=bin/release-key/release.key pub=bin/release-key/release.pub
	if [ ! -f "$key" ]; then
		"$GO" run ./cmd/lethectl keygen --name release --out bin/release-key >/dev/null
	fi
	say "signing with the development key $key: set LETHE_RELEASE_KEY and LETHE_RELEASE_PUB for a real release"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$GO" build -o "$tmp/lethe-release" ./internal/cmd/lethe-release

rm -rf "$DIST"
mkdir -p "$DIST"
extra=(README.md docs/*.md deploy/*.yaml deploy/nats-server.conf deploy/systemd/*.service)
for platform in $PLATFORMS; do
	goos="${platform%/*}" goarch="${platform#*/}"
	bins="$tmp/$goos-$goarch"
	mkdir -p "$bins"
	for c in $CMDS; do
		tags=""
		[ "$c" = lethe-agent ] && tags="-tags=lethe_noemulation"
		say "building $c for $platform"
		CGO_ENABLED=0 GOOS="$goos" GOARCH="$goarch" "$GO" build $tags -trimpath -buildvcs=true \
			-ldflags "-s -w -buildid= -X github.com/lethe-cc/lethe/internal/version.Version=$VERSION" \
			-o "$bins/$c" "./cmd/$c"
	done
	"$tmp/lethe-release" package -dist "$DIST" -version "$VERSION" -epoch "$SOURCE_DATE_EPOCH" \
		-platform "$platform" -bins "$bins" "${extra[@]}"
done
"$tmp/lethe-release" sign -dist "$DIST" -key "$key"
if [ -n "$pub" ]; then
	"$tmp/lethe-release" verify -key "$pub" "$DIST"
fi
(cd "$DIST" && sha256sum -c --quiet SHA256SUMS)
say "release $VERSION in $DIST (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
