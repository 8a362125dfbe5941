# Shared by the scripts: installing Debian packages, as root or with sudo.
# The sourcing script defines `log` and `die` first (each with its own
# prefix).

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi
}

apt_updated=""
apt_install() {
  command -v apt-get >/dev/null || die "cannot install $* (no apt-get); install it by hand"
  if [ -z "$apt_updated" ]; then
    sudo_if_needed apt-get update -qq
    apt_updated=1
  fi
  log "installing $* from Debian's packages"
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Stops the process whose pid is in file $1 with signal $2 (waiting up to
# 10 s for it to go), removes the file, and logs "$3 stopped (<signal>)".
# Nothing to do without the file.
stop_pid_file() {
  local file="$1" signal="$2" what="$3" pid
  [ -f "$file" ] || return 0
  pid="$(cat "$file")"
  kill "-$signal" "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$file"
  log "$what stopped ($signal)"
}
