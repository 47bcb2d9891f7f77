#!/usr/bin/env bash
# Install Debian's dcmtk, orthanc, dicom3tools, dcm2niix, openssl and chromium when a tool is
# missing and we are root. chromium is the headless browser the dashboard test loads pages in.
# dcm2niix is the independent reference for gantry-tilt correction (tests/test_tilt.py skips
# that comparison without it).
set -euo pipefail
missing=()
command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v dcm2niix >/dev/null 2>&1 || missing+=(dcm2niix)
# openssl makes the test certificates of the DICOM TLS tests (tests/tlscerts.py).
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian package starts a system Orthanc on 4242/8042; tests start their own.
if command -v service >/dev/null 2>&1; then service orthanc stop >/dev/null 2>&1 || true; fi
