#!/usr/bin/env bash
# Classify one study over HTTP(S) with curl: the request a service in any language sends to the
# ct_triage ensemble (KServe v2 protocol with Triton's binary tensor extension), no Python needed.
#
#   client/classify_over_http.sh [--url HOST:PORT | --url https://HOST[:PORT]] [--model ct_triage] [--series UID] FILE...
#
# --url: the server (default localhost:8000, plain HTTP), or a base URL such as a TLS proxy's.
# FILE...: one ZIP of the study, one multi-frame DICOM file, or the slice files of the study; each
# file is one element of the BYTES input DICOM. Prints the server's JSON answer (PROBABILITY,
# PATHOLOGY, STUDY_UID, SERIES_UID, META) on stdout; a refused study prints {"error": "..."} and
# exits 22 (HTTP 400: a bad study; 503: the server is busy or a queue timed out).
# curl holds the whole request in memory while sending it.
set -euo pipefail

url=localhost:8000 model=ct_triage series=
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --url) url=$2 ;;
        --model) model=$2 ;;
        --series) series=$2 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift 2
done
[[ $url == http://* || $url == https://* ]] || url=http://$url
if [[ $# -eq 0 ]]; then
    echo "usage: $0 [--url HOST:PORT] [--model ct_triage] [--series UID] FILE..." >&2
    exit 2
fi
if [[ -n $series && ! $series =~ ^[0-9.]{1,64}$ ]]; then
    echo "--series must be a DICOM UID (digits and dots, at most 64)" >&2
    exit 2
fi

# Binary tensor extension: a BYTES element is its length as 4 bytes little-endian, then the bytes;
# binary_data_size is the size of all elements together, and the JSON header's own length goes in
# the Inference-Header-Content-Length header.
total=0
for file in "$@"; do
    [[ -f $file ]] || { echo "not a file: $file" >&2; exit 2; }
    total=$((total + 4 + $(stat -c %s "$file")))
done
parameters=
[[ -z $series ]] || parameters=",\"parameters\":{\"series_uid\":\"$series\"}"
header="{\"inputs\":[{\"name\":\"DICOM\",\"shape\":[$#],\"datatype\":\"BYTES\",\"parameters\":{\"binary_data_size\":$total}}]$parameters}"

length_prefix() {  # $1 as 4 bytes, little-endian
    local n=$1
    # shellcheck disable=SC2059  # the format is made of the \xHH escapes of the bytes themselves
    printf "\\x$(printf %02x $((n & 255)))\\x$(printf %02x $((n >> 8 & 255)))\\x$(printf %02x $((n >> 16 & 255)))\\x$(printf %02x $((n >> 24 & 255)))"
}

{
    printf %s "$header"
    for file in "$@"; do
        length_prefix "$(stat -c %s "$file")"
        cat -- "$file"
    done
} | curl --silent --show-error --fail-with-body -X POST \
    -H "Content-Type: application/octet-stream" \
    -H "Inference-Header-Content-Length: ${#header}" \
    --data-binary @- "${url%/}/v2/models/$model/infer"
echo
