#!/usr/bin/env bash
# Install the TeX Live subset the paper needs (Debian packages), once. Idempotent and quick when present.
set -euo pipefail
need=()
command -v latexmk >/dev/null || need+=(latexmk)
kpsewhich booktabs.sty >/dev/null 2>&1 || need+=(texlive-latex-base texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended)
command -v pdftotext >/dev/null || need+=(poppler-utils)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends texlive-latex-base texlive-latex-recommended \
  texlive-latex-extra texlive-fonts-recommended latexmk poppler-utils >/dev/null
