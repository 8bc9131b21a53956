#!/usr/bin/env bash
# Fetch the PPAP datasets, the DINO / DINOv2 weights and the PPAP authors' checkpoints into the
# layout ppap.py expects.  Run `bash download.sh --help` for usage.
set -euo pipefail

# The PPAP authors' released checkpoints (Google Drive file ids as given in their README), for
# auditing; `bash download.sh checkpoints [DIR]` stores them as DIR/<local name> and writes this
# table to DIR/checkpoints.tsv.  dataset / arch / patch use ppap.py's names.
#  local name                 Google Drive file id               dataset    arch      patch
PPAP_CKPTS=(
  "ppap_cocostuff_vits8.pth   162h3jZfribkfHcGQ_6THp8mLYbnST_P0  cocostuff  vit_small 8"
  "ppap_cocostuff_vits16.pth  1U6fsOnZJev5gj6LTjtb8x1iPjzjy1nOX  cocostuff  vit_small 16"
  "ppap_cityscapes_vitb8.pth  1kATTeEH3LllmGz3PPyn34lyBxavSUGLe  cityscapes vit_base  8"
  "ppap_potsdam_vitb8.pth     1CDngRnD8bVqzuILTmbink61hB4IUVzxE  potsdam    vit_base  8"
)

STEGO_MIRROR="${PPAP_STEGO_MIRROR:-https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data}"
DINO_BASE="${PPAP_DINO_BASE:-https://dl.fbaipublicfiles.com/dino}"
DINOV2_BASE="${PPAP_DINOV2_BASE:-https://dl.fbaipublicfiles.com/dinov2}"
IMAGENET_S_BASE="${PPAP_IMAGENET_S_BASE:-https://github.com/LUSSeg/ImageNet-S/releases/download/ImageNet-S}"
# Google Drive: the first request goes to DRIVE_BASE?export=download&id=ID; a "can't scan this file
# for viruses" page is answered by resubmitting its form to DRIVE_CONFIRM_BASE.  For a file:// base
# (the tests) the query becomes a path: BASE/export=download/id=ID (see drive_url).
DRIVE_BASE="${PPAP_DRIVE_BASE:-https://drive.google.com/uc}"
DRIVE_CONFIRM_BASE="${PPAP_DRIVE_CONFIRM_BASE:-https://drive.usercontent.google.com/download}"
CITYSCAPES_SITE="https://www.cityscapes-dataset.com"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # ppap.py's folder: the backbone weights are its BACKBONES'
# ImageNet-S annotation archives (masks only; the images come from ImageNet-1k).  The hex part
# of each name is the archive's MD5 as published by the ImageNet-S authors (checked, warn only).
declare -A IMAGENET_S_ZIP=(
  [50]=ImageNetS50-a0fe9d82231f9bc4787ee76e304dfa51.zip
  [300]=ImageNetS300-dd8e42e156bac415a35c3c239de297bf.zip
  [919]=ImageNetS919-5f7f58ae1003d21da9409a8576bf7680.zip
)
DATASETS="cocostuff cityscapes potsdam imagenet-s weights checkpoints all"

usage() {
  cat <<EOF
usage: bash download.sh <cocostuff|cityscapes|potsdam|imagenet-s|weights|checkpoints|all> [DATA_DIR] [options]

Downloads (resumably), checks and extracts a dataset into DATA_DIR/<dataset>/, then checks the
layout ppap.py expects and lists exactly what is missing.  DATA_DIR defaults to \$PPAP_DATA or ./data
(the same default as ppap.py --data-dir).  Already complete datasets are left alone.

  cocostuff   STEGO mirror cocostuff.zip  -> DATA_DIR/cocostuff/{images,annotations,curated}
  cityscapes  official site (login; set CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD) or, without
              credentials, the STEGO mirror cityscapes.zip -> DATA_DIR/cityscapes/{leftImg8bit,gtFine}
  potsdam     STEGO mirror potsdam.zip    -> DATA_DIR/potsdam/{imgs,gt,labelled_train.txt,labelled_test.txt}
  imagenet-s  ImageNet-S masks (IMAGENET_S=50|300|919|all, default 50) -> DATA_DIR/imagenet-s/ImageNetS<K>/;
              the images are ImageNet-1k's: set IMAGENET_DIR=<dir with train/ and val/> to symlink them
  weights     the four DINO and the four DINOv2 (ViT-S/14, ViT-B/14, each also with 4 registers)
              checkpoints -> \${TORCH_HOME:-\${XDG_CACHE_HOME:-~/.cache}/torch}/hub/checkpoints/, named as
              torch.hub stores them; WEIGHTS=dino|dinov2|all picks a set (default all; each set is
              roughly 0.8-0.9 GB)
  all         all of the above (continues past failures; exit status 1 if any is incomplete); not
              the checkpoints below
  checkpoints bash download.sh checkpoints [DIR]: the PPAP authors' four released checkpoints (for
              auditing; not needed to train) from Google Drive into DIR (default \$PPAP_CHECKPOINTS or
              ./checkpoints) as ppap_cocostuff_vits8.pth, ppap_cocostuff_vits16.pth,
              ppap_cityscapes_vitb8.pth and ppap_potsdam_vitb8.pth, and DIR/checkpoints.tsv (a header
              line, then per checkpoint: name, Drive file id, dataset, arch, patch, tab-separated).
              When Drive refuses (quota, permissions) the error names the page to download the file
              from by hand and the path to save it as.

options:
  --check-only   only check the layout (no network); exit 1 and list what is missing if incomplete
  --dry-run      print the download / extract commands instead of running them (no network)
  --keep-zip     keep the archives after a successful extraction (default: delete them)
  -h, --help     this help

Transfers resume: an interrupted download continues from DATA_DIR/.downloads/<file>.part, or from
<file>.part next to a weight or checkpoint (curl -C - / wget -c), if that file starts like what is
expected (a zip archive; a torch checkpoint: a zip or a pickle); otherwise, and when the server cannot
resume, the transfer starts over.  Sizes are compared with the server's Content-Length (not with an
error answer's), a zip must end with its central directory (a transfer cut short keeps its .part to
resume), archives are tested before extraction, and an HTML error page is never kept.  A whole file
already in place is kept, whatever the server answers.
DOWNLOADER=curl|wget forces a client; PYTHON selects the interpreter used for zip fallbacks, file
checks and reading Google Drive's confirmation page (default python3).  PPAP_STEGO_MIRROR,
PPAP_DINO_BASE, PPAP_DINOV2_BASE, PPAP_IMAGENET_S_BASE, PPAP_DRIVE_BASE and PPAP_DRIVE_CONFIRM_BASE
override where files come from.
EOF
}

die() { echo "error: $*" >&2; exit 2; }    # usage errors
fail() { echo "error: $*" >&2; exit 1; }   # a failed download or check: one line, "what (url) -> what to do"
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
CK_DIR="${DATA_DIR:-${PPAP_CHECKPOINTS:-./checkpoints}}"   # `checkpoints` only
CK_DIR="${CK_DIR%/}"; CK_DIR="${CK_DIR:-/}"
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
  if [ "$DRY_RUN" = 1 ]; then say "dry run: nothing was downloaded (run it without --dry-run to fetch)"
  else say "all datasets and weights complete"; fi
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

# ---------------------------------------------------------------- what a file is
magic() {  # the first 4 bytes of $1 in hex
  head -c 4 "$1" 2>/dev/null | od -An -tx1 | tr -d ' \n'
}
zip_start_ok() {  # $1 starts like a zip: a local file header (PK\3\4) or a spanning marker (PK\7\8)
  case "$(magic "$1")" in 504b0304|504b0708) return 0 ;; *) return 1 ;; esac
}
zip_whole() {  # $1 is a zip with its end-of-central-directory record, which a cut-short transfer lacks
  zip_start_ok "$1" || return 1
  # torch.save writes no zip comment: the record is then the last 22 bytes
  [ "$(tail -c 22 "$1" | head -c 4 | od -An -tx1 | tr -d ' \n')" != 504b0506 ] || return 0
  [ -n "$PY" ] || return 1
  "$PY" -c 'import sys, zipfile; sys.exit(0 if zipfile.is_zipfile(sys.argv[1]) else 1)' "$1" 2>/dev/null
}
ckpt_start_ok() {  # $1 starts like torch.save output: a zip (PK\3\4) or a pickle (protocol 2-5)
  case "$(magic "$1")" in 504b0304|8002*|8003*|8004*|8005*) return 0 ;; *) return 1 ;; esac
}
ckpt_ok() {  # $1 is a whole torch checkpoint as far as can be told (a legacy pickle has no end marker)
  ckpt_start_ok "$1" || return 1
  [ "$(magic "$1")" = 504b0304 ] || return 0
  zip_whole "$1"
}
part_whole() {  # $1 is a zip checkpoint with its central directory: whole (a pickle cannot tell)
  [ "$(magic "$1")" = 504b0304 ] && zip_whole "$1"
}
# fetch handles two kinds of file: zip (a dataset archive) and ckpt (a torch checkpoint)
kind_name() { case "$1" in zip) echo "zip archive" ;; ckpt) echo "torch checkpoint" ;; esac; }
starts_as() {  # starts_as KIND FILE: FILE begins like a KIND, so it may be one or the start of one
  case "$1" in zip) zip_start_ok "$2" ;; ckpt) ckpt_start_ok "$2" ;; esac
}
whole_as() {  # whole_as KIND FILE: FILE is a whole KIND as far as can be told
  case "$1" in zip) zip_whole "$2" ;; ckpt) ckpt_ok "$2" ;; esac
}
describe() {  # what $1 is, for an error line: "an HTML page ("<title>")", "an empty file", ...
  local title
  if [ ! -s "$1" ]; then echo "an empty file"; return 0; fi
  if head -c 2048 "$1" | tr -d '\000' | grep -qiE '<html|<!doctype|<head|<body|<form|<title'; then
    # (LC_ALL=C: in a UTF-8 locale sed's .* stops at the binary after a page, which then leaks out)
    title=$(head -c 65536 "$1" | tr -d '\000' | tr '\r\n\t' '   ' \
      | LC_ALL=C sed -n 's:.*<[Tt][Ii][Tt][Ll][Ee][^>]*>\([^<]*\)</[Tt][Ii][Tt][Ll][Ee]>.*:\1:p' | sed 's/  */ /g; s/^ //; s/ $//' | head -c 120)
    echo "an HTML page${title:+ (\"$title\")}"
  else
    echo "$(file_size "$1") bytes starting with $(magic "$1" | sed 's/../& /g; s/ $//')"
  fi
}
# ---------------------------------------------------------------- transfers
mirror_hint() {  # the advice when the server at $1's address sends something other than the file
  echo "open that address in a browser to see why, or set $1 to a copy that has the file, then run the same command again"
}

remote_size() {  # Content-Length of $1 after redirects; empty when the server does not say or answers an error
  local url="$1" out="" rc=0; shift
  if [ "$DL" = curl ]; then out=$(curl -fsSIL --max-time 60 "$@" "$url" 2>/dev/null) || rc=$?
  else out=$(wget --spider -S --max-redirect=20 --timeout=60 "$@" "$url" 2>&1) || rc=$?; fi
  # An error page's length (a 403's 110 bytes) is not the file's: believed, it made a whole file look
  # "larger than the remote file" and get deleted.  curl -f still prints the failed response's headers.
  [ "$rc" = 0 ] || return 0
  printf '%s\n' "$out" | tr -d '\r' | awk '
    { sub(/^[ \t]+/, "") }
    /^HTTP\// { code = $2; n = ""; next }
    tolower($1) == "content-length:" && $2 ~ /^[0-9]+$/ { n = $2 }
    END { if (code == "" || code == "200") print n }'
}

drive_url() {  # drive_url BASE QUERY: BASE?QUERY; for a file:// BASE (tests): BASE/QUERY with each & as /
  case "$1" in file://*) printf '%s/%s\n' "$1" "${2//&//}" ;; *) printf '%s?%s\n' "$1" "$2" ;; esac
}

cookie_args() {  # the client options that read and write the cookie jar $1
  if [ "$DL" = curl ]; then printf '%s\n' -b "$1" -c "$1"
  else printf '%s\n' "--load-cookies=$1" "--save-cookies=$1" --keep-session-cookies; fi
}

dl_probe() {  # dl_probe URL OUT JAR: the first 64 KiB of URL (a Drive page, or the file's start), any HTTP status
  local c=(); mapfile -t c < <(cookie_args "$3")
  if [ "$DL" = curl ]; then curl -sSL --retry 3 -r 0-65535 "${c[@]}" -o "$2" "$1"
  else wget -q --tries=3 --content-on-error --header='Range: bytes=0-65535' "${c[@]}" -O "$2" "$1"; fi
}

dl_get() {  # dl_get URL OUT HEADERS [client args]: resumable GET into OUT, response headers saved in HEADERS
  local url="$1" out="$2" hdr="$3" rc; shift 3
  if [ "$DL" = curl ]; then
    curl -fL --retry 5 --retry-delay 5 -C - -D "$hdr" "$@" -o "$out" "$url"
  else   # wget -S prints the headers (indented) with its other messages on stderr
    set +e
    wget -c --tries=5 -S "$@" -O "$out" "$url" 2>&1 | tee "$hdr" >&2
    rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
  fi
}

resp_total() {  # the whole file's size from the last response in a header dump (curl -D / wget -S), or ""
  tr -d '\r' <"$1" | awk '
    { sub(/^[ \t]+/, "") }
    /^HTTP\// { code = $2; len = ""; tot = ""; next }
    tolower($1) == "content-length:" && $2 ~ /^[0-9]+$/ { len = $2 }
    tolower($1) == "content-range:" { n = split($0, a, "/"); if (a[n] ~ /^[0-9]+$/) tot = a[n] }
    END { if (tot != "") print tot; else if (code == "" || code == "200") print len }'
}

resp_status() {  # the HTTP status of the last response in a header dump, or ""
  tr -d '\r' <"$1" | awk '{ sub(/^[ \t]+/, "") } /^HTTP\// { code = $2 } END { print code }'
}

get_part() {  # get_part URL PART HEADERS [client args]: dl_get, once more from the start if the server cannot resume
  local url="$1" part="$2" hdr="$3" had rc=0; shift 3
  had=$(file_size "$part")
  dl_get "$url" "$part" "$hdr" "$@" || rc=$?
  # A server without Range support answers with the whole file: curl then stops (exit 33), and
  # resuming again can never work
  if [ "$rc" != 0 ] && [ "$had" -gt 0 ] && { [ "$rc" = 33 ] || [ "$(resp_status "$hdr")" = 200 ]; }; then
    say "the server cannot resume $part: starting over"
    rm -f "$part"; rc=0
    dl_get "$url" "$part" "$hdr" "$@" || rc=$?
  fi
  return "$rc"
}

fetch() {  # fetch KIND HINT URL DEST [client args]: resumable, size- and format-checked, atomic rename at the end
  # KIND is zip or ckpt (what DEST must be); HINT is the advice when the server sends something else
  local kind="$1" hint="$2" url="$3" dest="$4"; shift 4
  local part="$dest.part" noun want have hdr status what rc=0
  noun=$(kind_name "$kind")
  run mkdir -p "$(dirname "$dest")"
  if [ "$DRY_RUN" = 1 ]; then
    if [ "$DL" = curl ]; then run curl -fL --retry 5 --retry-delay 5 -C - "$@" -o "$part" "$url"
    else run wget -c --tries=5 "$@" -O "$part" "$url"; fi
    run mv -f "$part" "$dest"
    return 0
  fi
  want=$(remote_size "$url" "$@")
  if [ -f "$dest" ]; then
    if ! starts_as "$kind" "$dest"; then
      say "$dest is $(describe "$dest"), not a $noun: fetching it again"; rm -f "$dest"
    elif whole_as "$kind" "$dest"; then
      # whatever the server says: its size may be of another version, or wrong
      if [ -n "$want" ] && [ "$(file_size "$dest")" != "$want" ]; then
        say "keeping $dest, a whole $noun of $(file_size "$dest") bytes (the server's has $want; delete it to fetch that one)"
      else say "have $dest"; fi
      return 0
    else
      say "$dest is cut short ($(file_size "$dest") bytes${want:+ of $want}): resuming it"; mv -f "$dest" "$part"
    fi
  fi
  if [ -f "$part" ] && ! starts_as "$kind" "$part"; then   # (an error page, say): resumed, it would corrupt the file
    say "$part is $(describe "$part"), not the start of a $noun: starting over"; rm -f "$part"
  fi
  if [ -f "$part" ] && zip_whole "$part"; then   # finished, but not renamed: whatever size the server gives
    say "$part is a whole $noun: using it"
  elif [ -n "$want" ] && [ "$(file_size "$part")" = "$want" ]; then
    say "$part already complete"
  else
    if [ -n "$want" ] && [ "$(file_size "$part")" -gt "$want" ]; then
      say "$part is larger than the remote file: starting over"; rm -f "$part"
    fi
    say "fetching $url -> $dest${want:+ ($want bytes)}"
    hdr=$(mktemp)
    get_part "$url" "$part" "$hdr" "$@" || rc=$?
    status=$(resp_status "$hdr"); rm -f "$hdr"
    if [ "$status" = 416 ]; then   # "range not satisfiable": the .part reaches past the end (wget exits 0)
      if whole_as "$kind" "$part"; then rc=0
      else
        rm -f "$part"   # longer than the server's file and not whole: no start of it
        fail "$part was longer than the file at $url, and not a whole $noun -> run the same command again to fetch it anew"
      fi
    fi
    if [ "$rc" != 0 ]; then
      if [ -f "$part" ] && ! starts_as "$kind" "$part"; then rm -f "$part"; fi
      case "$status" in
        408|429) ;;
        4??) fail "download failed, HTTP $status ($url) -> $hint" ;;
      esac
      fail "download failed, $DL exit status $rc ($url) -> run the same command again to resume from $part"
    fi
  fi
  have=$(file_size "$part")
  if ! starts_as "$kind" "$part"; then
    what=$(describe "$part"); rm -f "$part"
    fail "$(basename "$dest") came as $what, not a $noun ($url) -> $hint"
  fi
  if [ -n "$want" ] && [ "$have" -lt "$want" ] && ! zip_whole "$part"; then
    fail "$part has $have bytes, expected $want ($url) -> run the same command again to resume"
  fi
  if ! whole_as "$kind" "$part"; then
    if [ -z "$want" ]; then   # no size from the server: only the missing end of the zip shows the cut
      fail "$part ends after $have bytes, before the end of its zip: the transfer was cut short ($url) -> run the same command again to resume"
    fi
    rm -f "$part"   # every byte the server has, and still not whole: its copy is broken
    fail "$(basename "$dest") came as $have bytes that do not make a whole $noun ($url) -> $hint"
  fi
  mv -f "$part" "$dest"
}

# ---------------------------------------------------------------- Google Drive
drive_confirm() {  # drive_confirm PAGE JAR ID: "BASE<tab>QUERY" of the file behind Drive's warning page
  [ -n "$PY" ] || return 1
  "$PY" - "$1" "$2" "$3" "$DRIVE_BASE" "${PPAP_DRIVE_BASE:-}" "$DRIVE_CONFIRM_BASE" "${PPAP_DRIVE_CONFIRM_BASE:-}" <<'PYEOF'
import html.parser, re, sys, urllib.parse
page, jar, fid, first, first_set, confirm, confirm_set = sys.argv[1:8]
text = open(page, 'rb').read().decode('utf-8', 'replace')

def google(url):  # an absolute https address on a Google host, as the page gives it
    u = urllib.parse.urlsplit(url)
    return u.scheme == 'https' and (u.hostname or '').endswith('.google.com')

class Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms, self.links, self.form = [], [], None
    def handle_starttag(self, tag, attrs):
        a = {k.lower(): (v or '') for k, v in attrs}
        if tag == 'form':
            self.form = (a.get('action', ''), [])
            self.forms.append(self.form)
        elif tag == 'input' and self.form is not None and a.get('type', '').lower() == 'hidden' and a.get('name'):
            self.form[1].append((a['name'], a.get('value', '')))
        elif tag == 'a' and 'confirm=' in a.get('href', ''):
            self.links.append(a['href'])
    def handle_endtag(self, tag):
        if tag == 'form':
            self.form = None

def found(base, default, override, params):
    base = override or (base if google(base) else default)
    print(urllib.parse.urlsplit(base)._replace(query='', fragment='').geturl() + '\t' + urllib.parse.urlencode(params))
    sys.exit(0)

p = Page()
p.feed(text)
# today's "can't scan this file for viruses" page: a form whose hidden inputs (id, export, confirm,
# uuid, ...) a browser sends to drive.usercontent.google.com/download
for action, params in p.forms:
    if any(k == 'confirm' for k, _ in params):
        found(action, confirm, confirm_set, params)
# older pages: a link /uc?export=download&confirm=TOKEN&id=ID (relative to drive.google.com)
for href in p.links:
    params = urllib.parse.parse_qsl(urllib.parse.urlsplit(href).query, keep_blank_values=True)
    if any(k == 'confirm' and v for k, v in params):
        if not any(k == 'id' for k, _ in params):
            params.append(('id', fid))
        found(href, first, first_set, params)
# a confirm token elsewhere in the page, or in a download_warning cookie
m = re.search(r'confirm=([0-9A-Za-z_-]+)', text)
token = m.group(1) if m else ''
if not token:
    for line in open(jar, errors='replace'):
        f = line.rstrip('\n').split('\t')
        if len(f) == 7 and f[5].startswith('download_warning'):
            token = f[6]
if token:
    found('', first, first_set, [('export', 'download'), ('confirm', token), ('id', fid)])
sys.exit(1)
PYEOF
}

drive_fetch() {  # drive_fetch NAME ID: one of the authors' checkpoints from Google Drive into CK_DIR/NAME
  local name="$1" id="$2" dest="$CK_DIR/$1" part="$CK_DIR/$1.part" tmp="$CK_DIR/.$1.drive"
  local first url line base query want have what rc c=()
  local manual="download it by hand from https://drive.google.com/file/d/$id/view and save it as $dest"
  first=$(drive_url "$DRIVE_BASE" "export=download&id=$id")
  if [ "$DRY_RUN" = 1 ]; then
    if [ "$DL" = curl ]; then run curl -sSL -r 0-65535 -b "$tmp/cookies" -c "$tmp/cookies" -o "$tmp/page" "$first"
    else run wget -q --content-on-error --header='Range: bytes=0-65535' "--load-cookies=$tmp/cookies" \
      "--save-cookies=$tmp/cookies" --keep-session-cookies -O "$tmp/page" "$first"; fi
    echo "  FILE_URL: that URL when it sends the file, or from the form on Drive's confirmation page ($DRIVE_CONFIRM_BASE?...)"
    if [ "$DL" = curl ]; then run curl -fL --retry 5 --retry-delay 5 -C - -b "$tmp/cookies" -o "$part" FILE_URL
    else run wget -c --tries=5 "--load-cookies=$tmp/cookies" -O "$part" FILE_URL; fi
    run mv -f "$part" "$dest"
    return 0
  fi
  if [ -f "$dest" ]; then
    if ckpt_ok "$dest"; then say "have $dest"; return 0
    elif ckpt_start_ok "$dest"; then say "$dest is a cut-short zip: resuming it"; mv -f "$dest" "$part"
    else say "$dest is $(describe "$dest"), not a torch checkpoint: fetching it again"; rm -f "$dest"; fi
  fi
  if [ -f "$part" ] && ! ckpt_start_ok "$part"; then   # (an error page, say): resumed, it would corrupt the file
    say "$part is $(describe "$part"), not the start of a torch checkpoint: starting over"; rm -f "$part"
  fi
  if part_whole "$part"; then mv -f "$part" "$dest"; say "saved $dest (it was whole in $part)"; return 0; fi
  rm -rf "$tmp"; mkdir -p "$tmp"; : >"$tmp/cookies"
  # shellcheck disable=SC2064  # (expanded now on purpose: $tmp is local; drive_fetch runs in a subshell)
  trap "rm -rf $(printf %q "$tmp")" EXIT
  mapfile -t c < <(cookie_args "$tmp/cookies")
  say "asking Google Drive for $name (file id $id)"
  dl_probe "$first" "$tmp/page" "$tmp/cookies" || true
  if [ ! -s "$tmp/page" ]; then
    fail "got nothing from Google Drive for $name ($first) -> check the connection and run the same command again, or $manual"
  elif ckpt_start_ok "$tmp/page"; then   # no confirmation needed: the file itself
    url="$first"
    if [ "$(file_size "$tmp/page")" -gt 65536 ] && [ "$(file_size "$tmp/page")" -gt "$(file_size "$part")" ]; then
      mv -f "$tmp/page" "$part"   # the server ignored the range and sent it all: keep it
    fi
  elif line=$(drive_confirm "$tmp/page" "$tmp/cookies" "$id"); then
    IFS=$'\t' read -r base query <<<"$line"
    url=$(drive_url "$base" "$query")
  else
    what=$(describe "$tmp/page"); [ -n "$PY" ] || what="$what (and there is no python to read it)"
    fail "Google Drive sent $what instead of $name ($first) -> $manual"
  fi
  : >"$tmp/headers"; rc=0
  if part_whole "$part"; then say "$part is whole"
  else
    say "fetching $url -> $dest"
    get_part "$url" "$part" "$tmp/headers" "${c[@]}" || rc=$?
  fi
  if [ "$rc" != 0 ] && [ "$(resp_status "$tmp/headers")" = 416 ] && ckpt_ok "$part"; then
    rc=0   # "range not satisfiable": the .part was already whole
  fi
  if [ "$rc" != 0 ]; then
    if [ -f "$part" ] && ! ckpt_start_ok "$part"; then rm -f "$part"; fi
    fail "download of $name failed, $DL exit status $rc ($url) -> run the same command again to resume, or $manual"
  fi
  want=$(resp_total "$tmp/headers"); have=$(file_size "$part")
  if [ -n "$want" ] && [ "$have" != "$want" ]; then
    fail "$part has $have bytes, expected $want ($url) -> run the same command again to resume"
  fi
  if ! ckpt_start_ok "$part"; then
    what=$(describe "$part"); rm -f "$part"
    fail "Google Drive sent $what instead of $name ($url) -> $manual"
  fi
  if ! ckpt_ok "$part"; then
    fail "$part is an incomplete zip ($url) -> run the same command again to resume, or $manual"
  fi
  mv -f "$part" "$dest"
  say "saved $dest ($have bytes)"
}

write_manifest() {  # CK_DIR/checkpoints.tsv: which local file is which checkpoint
  local row name id ds arch patch tmp="$CK_DIR/checkpoints.tsv.tmp"
  mkdir -p "$CK_DIR"
  printf 'name\tfile_id\tdataset\tarch\tpatch\n' >"$tmp"
  for row in "${PPAP_CKPTS[@]}"; do
    read -r name id ds arch patch <<<"$row"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$id" "$ds" "$arch" "$patch" >>"$tmp"
  done
  mv -f "$tmp" "$CK_DIR/checkpoints.tsv"
}

checkpoints() {  # the four, each in a subshell so that one refusal does not stop the others
  local row name id ds arch patch rc failed=()
  run mkdir -p "$CK_DIR"
  for row in "${PPAP_CKPTS[@]}"; do
    read -r name id ds arch patch <<<"$row"
    say "$name <- Google Drive file $id ($ds, $arch/$patch)"
    set +e
    ( set -e; drive_fetch "$name" "$id" )
    rc=$?
    set -e
    [ "$rc" = 0 ] || failed+=("$name")
  done
  if [ "${#failed[@]}" -gt 0 ]; then   # each failure has printed its error line
    check_layout checkpoints || true
    say "not fetched: ${failed[*]} (see the error lines above)"
    exit 1
  fi
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
    echo "error: $1 is corrupt (its zip test failed) -> delete it and run the same command again" >&2; exit 1
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
need_ckpt() {  # need_ckpt PATH [WHERE FROM]: PATH is a whole torch checkpoint
  if [ ! -e "$1" ]; then echo "missing: $1${2:+ (from $2)}"; MISSING=$((MISSING + 1))
  elif ! ckpt_ok "$1"; then echo "invalid: $1 is $(describe "$1"), not a torch checkpoint${2:+ (from $2)}"; MISSING=$((MISSING + 1)); fi
}

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

WEIGHT_URLS=()   # the weights to fetch, by WEIGHTS=dino|dinov2|all
case "${WEIGHTS:-all}" in
  dino|dinov2|all) ;;
  *) [ "$DATASET" != weights ] || die "WEIGHTS must be dino, dinov2 or all, not '${WEIGHTS}'" ;;
esac
# The released backbone files are those of ppap.py's BACKBONES registry (one list for both); listing them
# imports ppap, so it takes the project's python (torch installed), asked only when weights are wanted.
if [ "$DATASET" = weights ] || [ "$DATASET" = all ]; then
  list_weights() { (cd "$HERE" && "$1" -c 'import ppap; print("\n".join(ppap.released_weights()))' 2>/dev/null); }
  released=$(list_weights "${PY:-python3}") || { [ -z "${PYTHON:-}" ] && released=$(list_weights "$HERE/.venv/bin/python"); } \
    || die "download.sh lists the backbone weights from ppap.py's BACKBONES, which needs the project's python: run it as PYTHON=.venv/bin/python bash download.sh $DATASET (after pip install -r requirements.txt)"
  while read -r url; do
    case "$url" in
      https://dl.fbaipublicfiles.com/dinov2/*)
        case "${WEIGHTS:-all}" in dinov2|all) WEIGHT_URLS+=("$DINOV2_BASE/${url#https://dl.fbaipublicfiles.com/dinov2/}") ;; esac ;;
      https://dl.fbaipublicfiles.com/dino/*)
        case "${WEIGHTS:-all}" in dino|all) WEIGHT_URLS+=("$DINO_BASE/${url#https://dl.fbaipublicfiles.com/dino/}") ;; esac ;;
      ?*) WEIGHT_URLS+=("$url") ;;
    esac
  done <<< "$released"
fi

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
      for s in "${WEIGHT_URLS[@]}"; do need_ckpt "$CKPT_DIR/$(basename "$s")"; done ;;
    checkpoints)
      for s in "${PPAP_CKPTS[@]}"; do
        read -r k _ <<<"$s"
        need_ckpt "$CK_DIR/$k" "$(awk '{print "https://drive.google.com/file/d/" $2 "/view"}' <<<"$s")"
      done
      need "$CK_DIR/checkpoints.tsv" ;;
  esac
}

report_layout() {  # report_layout NAME: exit 0 when complete, 1 (with the list) otherwise
  local where="$DATA_DIR/$1" pre="" arg="$DATA_DIR"
  [ "$1" = weights ] && where="$CKPT_DIR"
  [ "$1" = checkpoints ] && where="$CK_DIR" && arg="$CK_DIR"
  check_layout "$1"
  if [ "$MISSING" -eq 0 ]; then say "OK: $1 complete in $where"; return 0; fi
  [ "$1" = imagenet-s ] && pre="IMAGENET_DIR=<ImageNet-1k dir> "
  [ "$1" = weights ] && [ -n "${WEIGHTS:-}" ] && pre="WEIGHTS=$WEIGHTS "
  echo "error: $1 incomplete in $where ($MISSING missing or invalid) — run: ${pre}bash download.sh $1 $arg" >&2
  return 1
}

# ---------------------------------------------------------------- per dataset
stego_dataset() {  # cocostuff / potsdam / cityscapes via the STEGO mirror
  local name="$1" zip="$DATA_DIR/.downloads/$1.zip"
  fetch zip "$(mirror_hint PPAP_STEGO_MIRROR)" "$STEGO_MIRROR/$name.zip" "$zip"
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
  local hint="check CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD (a failed login gets a page, not the archive), then run the same command again"
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
    if [ "$DL" = curl ]; then fetch zip "$hint" "$CITYSCAPES_SITE/file-handling/?packageID=${pkg%%:*}" "$zip" -b "$cookies"
    else fetch zip "$hint" "$CITYSCAPES_SITE/file-handling/?packageID=${pkg%%:*}" "$zip" --load-cookies="$cookies"; fi
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
linked = relinked = missing = 0
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
            # a link into where ImageNet used to be dangles: exists() is False, yet the name is taken
            relinked += os.path.lexists(dst)
            tmp = dst + '.tmp'
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(os.path.abspath(index[stem]), tmp)
            os.replace(tmp, dst)
            linked += 1
print('[download.sh] linked %d images (%d replacing dangling links), %d not found under %s'
      % (linked, relinked, missing, src))
PYEOF
}

imagenet_s() {
  local k zip md5
  for k in $IMAGENET_S_VARIANTS; do
    zip="$DATA_DIR/.downloads/${IMAGENET_S_ZIP[$k]}"
    if [ -d "$DATA_DIR/imagenet-s/ImageNetS$k/validation-segmentation" ]; then
      say "have ImageNet-S$k masks"
    else
      fetch zip "$(mirror_hint PPAP_IMAGENET_S_BASE)" "$IMAGENET_S_BASE/${IMAGENET_S_ZIP[$k]}" "$zip"
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
  local url var
  run mkdir -p "$CKPT_DIR"
  for url in "${WEIGHT_URLS[@]}"; do
    case "$url" in "$DINOV2_BASE"/*) var=PPAP_DINOV2_BASE ;; *) var=PPAP_DINO_BASE ;; esac
    fetch ckpt "$(mirror_hint "$var")" "$url" "$CKPT_DIR/$(basename "$url")"
  done
}

# ---------------------------------------------------------------- main
if [ "$CHECK_ONLY" = 1 ]; then report_layout "$DATASET"; exit $?; fi
if [ "$DATASET" = checkpoints ] && [ "$DRY_RUN" = 0 ]; then write_manifest; fi

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
      trap 'rc=$?; if [ "$rc" -ne 0 ]; then echo "[download.sh] the STEGO mirror for cityscapes failed" >&2; cityscapes_steps; fi' EXIT
      stego_dataset cityscapes
      trap - EXIT
    fi ;;
  imagenet-s) imagenet_s ;;
  weights) weights ;;
  checkpoints) checkpoints ;;
esac
if [ "$DRY_RUN" = 1 ]; then say "dry run: nothing was downloaded"; exit 0; fi
report_layout "$DATASET"
