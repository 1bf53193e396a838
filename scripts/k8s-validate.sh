#!/usr/bin/env bash
# The name issue 6 uses; the script is validate-k8s.sh.
exec "$(dirname "$0")/validate-k8s.sh" "$@"
