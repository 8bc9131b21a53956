#!/usr/bin/env bash
# Fetch the PPAP datasets and DINO weights into the layout ppap.py expects.
# Run `bash download.sh --help` for usage.
set -euo pipefail

STEGO_MIRROR="${PPAP_STEGO_MIRROR:-https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data}"
DINO_BASE="${PPAP_DINO_BASE:-https://dl.fbaipublicfiles.com/dino}"
IMAGENET_S_BASE="${PPAP_IMAGENET_S_BASE:-https://github.com/LUSSeg/ImageNet-S/releases/download/ImageNet-S}"
CITYSCAPES_SITE="https://www.cityscapes-dataset.com"
DINO_FILES=(
  dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth
  dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth
  dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth
  dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth
)
# ImageNet-S annotation archives (masks only; the images come from ImageNet-1k).  The hex part
# of each name is the archive's MD5 as published by the ImageNet-S authors (checked, warn only).
declare -A IMAGENET_S_ZIP=(
  [50]=ImageNetS50-a0fe9d82231f9bc4787ee76e304dfa51.zip
  [300]=ImageNetS300-dd8e42e156bac415a35c3c239de297bf.zip
  [919]=ImageNetS919-5f7f58ae1003d21da9409a8576bf7680.zip
)
DATASETS="cocostuff cityscapes potsdam imagenet-s weights all"

usage() {
  cat <<EOF
usage: bash download.sh <cocostuff|cityscapes|potsdam|imagenet-s|weights|all> [DATA_DIR] [options]

Downloads (resumably), checks and extracts a dataset into DATA_DIR/<dataset>/, then checks the
layout ppap.py expects and lists exactly what is missing.  DATA_DIR defaults to \$PPAP_DATA or ./data
(the same default as ppap.py --data-dir).  Already complete datasets are left alone.

  cocostuff   STEGO mirror cocostuff.zip  -> DATA_DIR/cocostuff/{images,annotations,curated}
  cityscapes  official site (login; set CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD) or, without
              credentials, the STEGO mirror cityscapes.zip -> DATA_DIR/cityscapes/{leftImg8bit,gtFine}
  potsdam     STEGO mirror potsdam.zip    -> DATA_DIR/potsdam/{imgs,gt,labelled_train.txt,labelled_test.txt}
  imagenet-s  ImageNet-S masks (IMAGENET_S=50|300|919|all, default 50) -> DATA_DIR/imagenet-s/ImageNetS<K>/;
              the images are ImageNet-1k's: set IMAGENET_DIR=<dir with train/ and val/> to symlink them
  weights     the four DINO checkpoints -> \${TORCH_HOME:-\${XDG_CACHE_HOME:-~/.cache}/torch}/hub/checkpoints/
  all         all of the above (continues past failures; exit status 1 if any is incomplete)

options:
  --check-only   only check the layout (no network); exit 1 and list what is missing if incomplete
  --dry-run      print the download / extract commands instead of running them (no network)
  --keep-zip     keep the archives after a successful extraction (default: delete them)
  -h, --help     this help

Transfers resume: an interrupted download continues from DATA_DIR/.downloads/<file>.part
(curl -C - / wget -c).  Sizes are compared with the server's Content-Length and archives are
tested before extraction.  DOWNLOADER=curl|wget forces a client; PYTHON selects the interpreter
used for zip fallbacks and file checks (default python3).
EOF
}

die() { echo "error: $*" >&2; exit 2; }
say() { echo "[download.sh] $*"; }

DATASET=""; DATA_DIR=""; CHECK_ONLY=0; DRY_RUN=0; KEEP_ZIP=0
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --check-only) CHECK_ONLY=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --keep-zip) KEEP_ZIP=1 ;;
    -*) die "unknown option $arg (see --help)" ;;
    *) if [ -z "$DATASET" ]; then DATASET="$arg"
       elif [ -z "$DATA_DIR" ]; then DATA_DIR="$arg"
       else die "unexpected argument $arg (see --help)"; fi ;;
  esac
done
[ -n "$DATASET" ] || { usage >&2; die "no dataset given (one of: $DATASETS)"; }
case " $DATASETS " in *" $DATASET "*) ;; *) die "unknown dataset '$DATASET' (one of: $DATASETS)" ;; esac
DATA_DIR="${DATA_DIR:-${PPAP_DATA:-./data}}"
DATA_DIR="${DATA_DIR%/}"; DATA_DIR="${DATA_DIR:-/}"
CKPT_DIR="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}/hub/checkpoints"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3 >/dev/null 2>&1; then PY=python3
  elif command -v python >/dev/null 2>&1; then PY=python; fi
fi

if [ "$DATASET" = all ]; then
  flags=()
  [ "$CHECK_ONLY" = 1 ] && flags+=(--check-only)
  [ "$DRY_RUN" = 1 ] && flags+=(--dry-run)
  [ "$KEEP_ZIP" = 1 ] && flags+=(--keep-zip)
  failed=()
  for d in cocostuff cityscapes potsdam imagenet-s weights; do
    bash "$0" "$d" "$DATA_DIR" ${flags[@]+"${flags[@]}"} || failed+=("$d")
  done
  if [ "${#failed[@]}" -gt 0 ]; then echo "error: incomplete: ${failed[*]}" >&2; exit 1; fi
  say "all datasets and weights complete"
  exit 0
fi

# ---------------------------------------------------------------- helpers
run() {  # run a state-changing command, or print it under --dry-run
  if [ "$DRY_RUN" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

pick_downloader() {
  if [ -n "${DOWNLOADER:-}" ]; then
    case "$DOWNLOADER" in curl|wget) ;; *) die "DOWNLOADER must be curl or wget" ;; esac
    [ "$DRY_RUN" = 1 ] || command -v "$DOWNLOADER" >/dev/null 2>&1 || die "$DOWNLOADER not found"
    echo "$DOWNLOADER"
  elif command -v curl >/dev/null 2>&1; then echo curl
  elif command -v wget >/dev/null 2>&1; then echo wget
  else die "neither curl nor wget is installed"; fi
}

file_size() { if [ -f "$1" ]; then wc -c <"$1" | tr -d ' '; else echo 0; fi; }

remote_size() {  # Content-Length of $1 after redirects, or empty when the server does not say
  local url="$1" out=""; shift
  if [ "$DL" = curl ]; then
    out=$(curl -sSIL --max-time 60 "$@" "$url" 2>/dev/null || true)
  else
    out=$(wget --spider -S --max-redirect=20 --timeout=60 "$@" "$url" 2>&1 || true)
  fi
  printf '%s\n' "$out" | tr -d '\r' | awk 'tolower($1)=="content-length:" && $2 ~ /^[0-9]+$/ {n=$2} END {print n}'
}

fetch() {  # fetch URL DEST [extra client args]: resumable, size-checked, atomic rename at the end
  local url="$1" dest="$2"; shift 2
  local part="$dest.part" want have
  run mkdir -p "$(dirname "$dest")"
  if [ "$DRY_RUN" = 1 ]; then
    if [ "$DL" = curl ]; then run curl -fL --retry 5 --retry-delay 5 -C - "$@" -o "$part" "$url"
    else run wget -c --tries=5 "$@" -O "$part" "$url"; fi
    run mv -f "$part" "$dest"
    return 0
  fi
  want=$(remote_size "$url" "$@")
  if [ -f "$dest" ]; then
    if [ -z "$want" ] || [ "$(file_size "$dest")" = "$want" ]; then say "have $dest"; return 0; fi
    say "$dest has $(file_size "$dest") bytes, server says $want: resuming it"
    mv -f "$dest" "$part"
  fi
  if [ -n "$want" ] && [ "$(file_size "$part")" -gt "$want" ]; then
    say "$part is larger than the remote file: starting over"; rm -f "$part"
  fi
  if [ -n "$want" ] && [ -f "$part" ] && [ "$(file_size "$part")" = "$want" ]; then
    say "$part already complete"
  else
    say "fetching $url -> $dest${want:+ ($want bytes)}"
    if [ "$DL" = curl ]; then curl -fL --retry 5 --retry-delay 5 -C - "$@" -o "$part" "$url"
    else wget -c --tries=5 "$@" -O "$part" "$url"; fi
  fi
  have=$(file_size "$part")
  if [ -n "$want" ] && [ "$have" != "$want" ]; then
    echo "error: $part has $have bytes, expected $want — run the same command again to resume" >&2
    exit 1
  fi
  mv -f "$part" "$dest"
}

zip_test() {
  if [ "$DRY_RUN" = 1 ]; then
    if command -v unzip >/dev/null 2>&1; then run unzip -tq "$1"; else run "${PY:-python3}" -c '<zipfile testzip>' "$1"; fi
    return 0
  fi
  local ok=0
  if command -v unzip >/dev/null 2>&1; then unzip -tq "$1" >/dev/null && ok=1
  elif [ -n "$PY" ]; then   # (python -m zipfile -t exits 0 even on a CRC error)
    "$PY" -c 'import sys, zipfile; sys.exit(1 if zipfile.ZipFile(sys.argv[1]).testzip() else 0)' "$1" \
      >/dev/null 2>&1 && ok=1
  else say "no unzip and no python: cannot test $1"; ok=1; fi
  if [ "$ok" != 1 ]; then
    echo "error: $1 is corrupt; delete it and run the same command again" >&2; exit 1
  fi
}

unpack() {  # unpack ZIP NAME: extract into DATA_DIR/NAME (archives with or without a NAME/ top folder)
  local zip="$1" name="$2" stage="$DATA_DIR/.extract-$2" dest="$DATA_DIR/$2" src entry
  zip_test "$zip"
  run rm -rf "$stage"
  run mkdir -p "$stage"
  say "extracting $zip -> $dest"
  if command -v unzip >/dev/null 2>&1; then run unzip -q -o "$zip" -d "$stage"
  else run "${PY:-python3}" -m zipfile -e "$zip" "$stage"; fi
  if [ "$DRY_RUN" = 1 ]; then run mv "$stage/$name" "$dest"; return 0; fi
  src="$stage"
  if [ -d "$stage/$name" ] && [ "$(ls -A "$stage" | wc -l)" -eq 1 ]; then src="$stage/$name"; fi
  mkdir -p "$dest"
  for entry in "$src"/* "$src"/.[!.]*; do
    [ -e "$entry" ] || continue
    if [ -e "$dest/$(basename "$entry")" ]; then cp -a "$entry" "$dest/" && rm -rf "$entry"
    else mv "$entry" "$dest/"; fi
  done
  rm -rf "$stage"
}

finish_zip() { if [ "$KEEP_ZIP" = 0 ]; then run rm -f "$1"; fi; }

# ---------------------------------------------------------------- layout checks
MISSING=0
need() { if [ ! -e "$1" ]; then echo "missing: $1"; MISSING=$((MISSING + 1)); fi; }

py_missing() {  # python script on stdin prints 'missing: ...' lines, then the number missing
  local out
  [ -n "$PY" ] || { cat >/dev/null; return 0; }
  out=$("$PY" - "$@") || { say "warning: file check failed"; return 0; }
  printf '%s\n' "$out" | sed '$d'
  MISSING=$((MISSING + $(printf '%s\n' "$out" | tail -n 1)))
}

need_listed() {  # need_listed LIST DIR EXT: every id in LIST has DIR/<id>.EXT
  [ -f "$1" ] && [ -d "$2" ] || return 0
  py_missing "$@" <<'PYEOF'
import os, sys
lst, d, ext = sys.argv[1:4]
ids = [l.strip() for l in open(lst) if l.strip()]
miss = [i for i in ids if not os.path.exists(os.path.join(d, i + ext))]
for i in miss[:3]:
    print('missing: ' + os.path.join(d, i + ext))
if len(miss) > 3:
    print('missing: ... %d of the %d files listed in %s' % (len(miss), len(ids), lst))
print(len(miss))
PYEOF
}

need_images_for_masks() {  # need_images_for_masks SEG_DIR IMG_DIR: an image for every mask
  [ -d "$1" ] && [ -d "$2" ] || return 0
  py_missing "$@" <<'PYEOF'
import os, sys
seg, img = sys.argv[1:3]
miss = []
for wnid in sorted(os.listdir(seg)):
    if not os.path.isdir(os.path.join(seg, wnid)):
        continue
    for f in sorted(os.listdir(os.path.join(seg, wnid))):
        stem = os.path.splitext(f)[0]
        if not any(os.path.exists(os.path.join(img, wnid, stem + e)) for e in ('.JPEG', '.jpg', '.jpeg', '.png')):
            miss.append(os.path.join(img, wnid, stem + '.JPEG'))
for m in miss[:3]:
    print('missing: ' + m)
if len(miss) > 3:
    print('missing: ... %d images for the masks in %s' % (len(miss), seg))
print(len(miss))
PYEOF
}

case "${IMAGENET_S:-50}" in
  50|300|919) IMAGENET_S_VARIANTS="${IMAGENET_S:-50}" ;;
  all) IMAGENET_S_VARIANTS="50 300 919" ;;
  *) die "IMAGENET_S must be 50, 300, 919 or all, not '${IMAGENET_S}'" ;;
esac

check_layout() {
  local root="$DATA_DIR/$1" s k
  MISSING=0
  case "$1" in
    cocostuff)
      for s in train2017 val2017; do need "$root/images/$s"; need "$root/annotations/$s"; done
      need "$root/curated/train2017/Coco164kFull_Stuff_Coarse.txt"
      need "$root/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"
      for s in train2017/Coco164kFull_Stuff_Coarse val2017/Coco164kFull_Stuff_Coarse_7; do
        need_listed "$root/curated/$s.txt" "$root/images/${s%%/*}" .jpg
        need_listed "$root/curated/$s.txt" "$root/annotations/${s%%/*}" .png
      done ;;
    cityscapes)
      for s in train val; do need "$root/leftImg8bit/$s"; need "$root/gtFine/$s"; done
      for s in train val; do
        if [ -d "$root/leftImg8bit/$s" ] && [ -z "$(find "$root/leftImg8bit/$s" -name '*_leftImg8bit.png' -print -quit)" ]; then
          echo "missing: $root/leftImg8bit/$s/<city>/*_leftImg8bit.png"; MISSING=$((MISSING + 1)); fi
        if [ -d "$root/gtFine/$s" ] && [ -z "$(find "$root/gtFine/$s" -name '*_gtFine_labelIds.png' -print -quit)" ]; then
          echo "missing: $root/gtFine/$s/<city>/*_gtFine_labelIds.png"; MISSING=$((MISSING + 1)); fi
      done ;;
    potsdam)
      need "$root/imgs"; need "$root/gt"; need "$root/labelled_train.txt"; need "$root/labelled_test.txt"
      for s in labelled_train labelled_test; do
        need_listed "$root/$s.txt" "$root/imgs" .mat
        need_listed "$root/$s.txt" "$root/gt" .mat
      done ;;
    imagenet-s)
      for k in $IMAGENET_S_VARIANTS; do
        for s in validation train-semi; do
          need "$root/ImageNetS$k/$s-segmentation"
          need "$root/ImageNetS$k/$s"
          need_images_for_masks "$root/ImageNetS$k/$s-segmentation" "$root/ImageNetS$k/$s"
        done
      done ;;
    weights)
      for f in "${DINO_FILES[@]}"; do need "$CKPT_DIR/$(basename "$f")"; done ;;
  esac
}

report_layout() {  # report_layout NAME: exit 0 when complete, 1 (with the list) otherwise
  local where="$DATA_DIR/$1"
  [ "$1" = weights ] && where="$CKPT_DIR"
  check_layout "$1"
  if [ "$MISSING" -eq 0 ]; then say "OK: $1 complete in $where"; return 0; fi
  local pre=""
  [ "$1" = imagenet-s ] && pre="IMAGENET_DIR=<ImageNet-1k dir> "
  echo "error: $1 incomplete in $where ($MISSING missing) — run: ${pre}bash download.sh $1 $DATA_DIR" >&2
  return 1
}

# ---------------------------------------------------------------- per dataset
stego_dataset() {  # cocostuff / potsdam / cityscapes via the STEGO mirror
  local name="$1" zip="$DATA_DIR/.downloads/$1.zip"
  fetch "$STEGO_MIRROR/$name.zip" "$zip"
  unpack "$zip" "$name"
  finish_zip "$zip"
}

cityscapes_steps() {
  cat >&2 <<EOF
Cityscapes needs an account at $CITYSCAPES_SITE:
  1. register at $CITYSCAPES_SITE/register/ and wait for the confirmation;
  2. either re-run with credentials:
       CITYSCAPES_USERNAME=<user> CITYSCAPES_PASSWORD=<password> bash download.sh cityscapes $DATA_DIR
     or download by hand gtFine_trainvaltest.zip (packageID=1) and leftImg8bit_trainvaltest.zip
     (packageID=3) from $CITYSCAPES_SITE/downloads/ and run
       unzip -o gtFine_trainvaltest.zip -d $DATA_DIR/cityscapes
       unzip -o leftImg8bit_trainvaltest.zip -d $DATA_DIR/cityscapes
  3. check: bash download.sh cityscapes $DATA_DIR --check-only
EOF
}

cityscapes_official() {
  local cookies="$DATA_DIR/.downloads/cityscapes.cookies" pkg file zip
  run mkdir -p "$DATA_DIR/.downloads"
  say "logging in to $CITYSCAPES_SITE as $CITYSCAPES_USERNAME"
  if [ "$DL" = curl ]; then
    run curl -fsSL -c "$cookies" -o /dev/null --data-urlencode "username=$CITYSCAPES_USERNAME" \
      --data-urlencode "password=$CITYSCAPES_PASSWORD" --data "submit=Login" "$CITYSCAPES_SITE/login/"
  else
    run wget -q --keep-session-cookies --save-cookies="$cookies" -O /dev/null \
      --post-data "username=$CITYSCAPES_USERNAME&password=$CITYSCAPES_PASSWORD&submit=Login" "$CITYSCAPES_SITE/login/"
  fi
  for pkg in 1:gtFine_trainvaltest.zip 3:leftImg8bit_trainvaltest.zip; do
    file="${pkg#*:}"; zip="$DATA_DIR/.downloads/$file"
    if [ "$DL" = curl ]; then fetch "$CITYSCAPES_SITE/file-handling/?packageID=${pkg%%:*}" "$zip" -b "$cookies"
    else fetch "$CITYSCAPES_SITE/file-handling/?packageID=${pkg%%:*}" "$zip" --load-cookies="$cookies"; fi
    # the official archives hold gtFine/ and leftImg8bit/ (plus README, license) at the top
    unpack "$zip" cityscapes
    finish_zip "$zip"
  done
  run rm -f "$cookies"
}

imagenet_s_link() {  # symlink the ImageNet-1k images that the ImageNet-S masks need
  local k="$1"
  if [ -z "${IMAGENET_DIR:-}" ]; then
    cat <<EOF
ImageNet-S$k masks are in $DATA_DIR/imagenet-s/ImageNetS$k; its images are ImageNet-1k images (not
redistributable).  With ImageNet-1k at <IMAGENET_DIR> (holding train/<wnid>/*.JPEG and val/, flat
or in class folders), link them with:
  IMAGENET_DIR=<IMAGENET_DIR> bash download.sh imagenet-s $DATA_DIR
(or use the ImageNet-S toolbox: datapreparation/data_preparation.sh <IMAGENET_DIR> $DATA_DIR/imagenet-s $k false).
Mask i/<name>.png pairs with image i/<name>.JPEG under validation/ and train-semi/.
EOF
    return 0
  fi
  [ -n "$PY" ] || die "python is needed to link the ImageNet images"
  say "linking ImageNet images from $IMAGENET_DIR into $DATA_DIR/imagenet-s/ImageNetS$k"
  run "$PY" - "$IMAGENET_DIR" "$DATA_DIR/imagenet-s/ImageNetS$k" <<'PYEOF'
import os, sys
src, root = sys.argv[1:3]
linked = missing = 0
for split, where in (('validation', 'val'), ('train-semi', 'train')):
    seg = os.path.join(root, split + '-segmentation')
    if not os.path.isdir(seg):
        continue
    index = {}
    for dirpath, _, files in os.walk(os.path.join(src, where)):
        for f in files:
            index.setdefault(os.path.splitext(f)[0], os.path.join(dirpath, f))
    for wnid in sorted(os.listdir(seg)):
        for f in sorted(os.listdir(os.path.join(seg, wnid))):
            stem = os.path.splitext(f)[0]
            dst = os.path.join(root, split, wnid, stem + '.JPEG')
            if os.path.exists(dst):
                continue
            if stem not in index:
                missing += 1
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.path.abspath(index[stem]), dst)
            linked += 1
print('[download.sh] linked %d images, %d not found under %s' % (linked, missing, src))
PYEOF
}

imagenet_s() {
  local k zip md5
  for k in $IMAGENET_S_VARIANTS; do
    zip="$DATA_DIR/.downloads/${IMAGENET_S_ZIP[$k]}"
    if [ -d "$DATA_DIR/imagenet-s/ImageNetS$k/validation-segmentation" ]; then
      say "have ImageNet-S$k masks"
    else
      fetch "$IMAGENET_S_BASE/${IMAGENET_S_ZIP[$k]}" "$zip"
      md5="${IMAGENET_S_ZIP[$k]%.zip}"; md5="${md5##*-}"
      if [ "$DRY_RUN" = 0 ] && command -v md5sum >/dev/null 2>&1; then
        [ "$(md5sum "$zip" | cut -d' ' -f1)" = "$md5" ] || say "warning: MD5 of $zip is not $md5"
      fi
      unpack "$zip" imagenet-s
      if [ "$DRY_RUN" = 0 ] && [ ! -d "$DATA_DIR/imagenet-s/ImageNetS$k" ] \
          && [ -d "$DATA_DIR/imagenet-s/validation-segmentation" ]; then   # archive without a top folder
        mkdir -p "$DATA_DIR/imagenet-s/ImageNetS$k"
        mv "$DATA_DIR/imagenet-s"/{validation-segmentation,train-semi-segmentation} "$DATA_DIR/imagenet-s/ImageNetS$k/" 2>/dev/null || true
      fi
      finish_zip "$zip"
    fi
    imagenet_s_link "$k"
  done
}

weights() {
  local f
  run mkdir -p "$CKPT_DIR"
  for f in "${DINO_FILES[@]}"; do fetch "$DINO_BASE/$f" "$CKPT_DIR/$(basename "$f")"; done
}

# ---------------------------------------------------------------- main
if [ "$CHECK_ONLY" = 1 ]; then report_layout "$DATASET"; exit $?; fi

if [ "$DRY_RUN" = 0 ] && check_layout "$DATASET" >/dev/null 2>&1 && [ "$MISSING" -eq 0 ]; then
  say "OK: $DATASET already complete (nothing to do)"
  exit 0
fi
DL=$(pick_downloader)
[ "$DRY_RUN" = 1 ] && say "dry run: commands are printed, not run (downloader: $DL)"
case "$DATASET" in
  cocostuff|potsdam) stego_dataset "$DATASET" ;;
  cityscapes)
    if [ -n "${CITYSCAPES_USERNAME:-}" ] && [ -n "${CITYSCAPES_PASSWORD:-}" ]; then cityscapes_official
    else
      say "no CITYSCAPES_USERNAME/CITYSCAPES_PASSWORD: trying the STEGO mirror"
      trap 'rc=$?; if [ "$rc" -ne 0 ]; then echo "error: the STEGO mirror for cityscapes failed" >&2; cityscapes_steps; fi' EXIT
      stego_dataset cityscapes
      trap - EXIT
    fi ;;
  imagenet-s) imagenet_s ;;
  weights) weights ;;
esac
[ "$DRY_RUN" = 1 ] && exit 0
report_layout "$DATASET"
