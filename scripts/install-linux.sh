#!/bin/sh
# Install tenbox from its apt repository and start tenboxd (the seed's
# installer; docs/packaging.md). POSIX sh, root, Debian and derivatives,
# amd64 and arm64. Running it again changes nothing and says so, except that
# tenboxd is restarted so that an edited /etc/tenbox/tenboxd.env is loaded.
#
#   curl -fsSL https://my.tenbox.ai/install-linux.sh | sudo sh
#   sudo sh install-linux.sh --cloud-url URL
#   sudo sh install-linux.sh --repo http://127.0.0.1:8080 --suite stable \
#        --keyring ./test-archive-keyring.gpg --no-kvm-check     # local repository
#
# Everything is inside main(), called on the last line, so that a truncated
# download does not run half a script.
set -eu

DEFAULT_REPO_URL=https://my.tenbox.ai/repo
DEFAULT_SUITE=stable
COMPONENT=main
LIST=/etc/apt/sources.list.d/tenbox.list
KEYRING_BASE=/usr/share/keyrings/tenbox-archive-keyring
ENV_DIR=/etc/tenbox
ENV_FILE=$ENV_DIR/tenboxd.env
DEFAULT_DATA_DIR=/var/lib/tenbox
DEFAULT_PAIR_WAIT_SEC=30

PROG=install-linux.sh
CHANGED=""        # what this run changed, for the closing line

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
changed() { CHANGED="$CHANGED${CHANGED:+, }$1"; }

usage() {
    cat <<EOF
Usage: $PROG [options]

Installs the tenbox package from its apt repository, writes
$ENV_FILE, adds \$SUDO_USER to the tenbox group, then enables and
restarts tenboxd and prints the cloud pairing URL if the daemon logs one.

Options (each also read from the environment variable shown):
  --repo URL         apt repository (TENBOX_REPO_URL; default $DEFAULT_REPO_URL)
  --suite NAME       repository suite (TENBOX_REPO_SUITE; default $DEFAULT_SUITE)
  --keyring FILE     the repository's signing key, binary or ASCII-armoured
                     (TENBOX_REPO_KEYRING; default: download URL/tenbox-archive-keyring.gpg)
  --trusted          use the repository without a signature check ([trusted=yes]):
                     only for a local test repository (TENBOX_REPO_TRUSTED=1)
  --cloud-url URL    cloud control plane for tenboxd (TENBOX_CLOUD_URL; default: none)
  --data-dir DIR     tenboxd's data directory (TENBOX_DATA_DIR; default $DEFAULT_DATA_DIR)
  --no-kvm-check     install on a host without usable KVM (CI, chroots)
  --pair-wait SEC    how long to wait for the pairing URL (default $DEFAULT_PAIR_WAIT_SEC; 0: don't)
  -h, --help         this help

Example:
  sudo sh $PROG --cloud-url wss://my.tenbox.ai/api/device-tunnel
EOF
}

need_value() {  # need_value OPTION VALUE
    [ -n "$2" ] || die "$1 needs a value (see --help)"
}

parse_args() {
    REPO_URL=${TENBOX_REPO_URL:-$DEFAULT_REPO_URL}
    SUITE=${TENBOX_REPO_SUITE:-$DEFAULT_SUITE}
    KEYRING_SRC=${TENBOX_REPO_KEYRING:-}
    TRUSTED=${TENBOX_REPO_TRUSTED:-0}
    CLOUD_URL=${TENBOX_CLOUD_URL:-}
    CLOUD_URL_GIVEN=${TENBOX_CLOUD_URL+1}
    DATA_DIR=${TENBOX_DATA_DIR:-$DEFAULT_DATA_DIR}
    DATA_DIR_GIVEN=${TENBOX_DATA_DIR+1}
    KVM_CHECK=1
    PAIR_WAIT=$DEFAULT_PAIR_WAIT_SEC
    while [ $# -gt 0 ]; do
        case $1 in
            --repo) need_value "$1" "${2:-}"; REPO_URL=$2; shift ;;
            --repo=*) REPO_URL=${1#*=} ;;
            --suite) need_value "$1" "${2:-}"; SUITE=$2; shift ;;
            --suite=*) SUITE=${1#*=} ;;
            --keyring) need_value "$1" "${2:-}"; KEYRING_SRC=$2; shift ;;
            --keyring=*) KEYRING_SRC=${1#*=} ;;
            --trusted) TRUSTED=1 ;;
            --cloud-url) [ $# -ge 2 ] || die "--cloud-url needs a value"; CLOUD_URL=$2; CLOUD_URL_GIVEN=1; shift ;;
            --cloud-url=*) CLOUD_URL=${1#*=}; CLOUD_URL_GIVEN=1 ;;
            --data-dir) need_value "$1" "${2:-}"; DATA_DIR=$2; DATA_DIR_GIVEN=1; shift ;;
            --data-dir=*) DATA_DIR=${1#*=}; DATA_DIR_GIVEN=1 ;;
            --no-kvm-check) KVM_CHECK=0 ;;
            --pair-wait) need_value "$1" "${2:-}"; PAIR_WAIT=$2; shift ;;
            --pair-wait=*) PAIR_WAIT=${1#*=} ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
        shift
    done
    REPO_URL=${REPO_URL%/}
    case $PAIR_WAIT in ''|*[!0-9]*) die "--pair-wait takes whole seconds, not '$PAIR_WAIT'" ;; esac
    case $DATA_DIR in /*) ;; *) die "--data-dir must be an absolute path, not '$DATA_DIR'" ;; esac
    case $REPO_URL in http://*|https://*|file:/*) ;; *) die "--repo must be an http(s):// or file:/ URL, not '$REPO_URL'" ;; esac
    case $SUITE in ''|*[!A-Za-z0-9._-]*) die "--suite '$SUITE' is not a suite name" ;; esac
    # tenboxd speaks to the cloud over TLS only: anything else would leave the link off.
    case $CLOUD_URL in ''|wss://?*) ;; *) die "--cloud-url must be a wss:// URL, not '$CLOUD_URL'" ;; esac
    if [ "$TRUSTED" = 1 ] && [ -n "$KEYRING_SRC" ]; then
        die "--trusted and --keyring exclude each other: a keyring means the signature is checked"
    fi
}

diagnostics() {
    # For a bug report about an unsupported system.
    echo "  uname: $(uname -srm)" >&2
    if [ -r /etc/os-release ]; then sed 's/^/  os-release: /' /etc/os-release >&2; fi
}

check_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root: sudo sh $PROG $*"
}

check_distribution() {
    [ -r /etc/os-release ] || { diagnostics; die "no /etc/os-release: cannot tell which distribution this is"; }
    # One subshell: os-release's variables must not leak into ours.
    # shellcheck disable=SC1091
    os=$(. /etc/os-release && printf '%s|%s|%s|%s' "${ID:-}" "${ID_LIKE:-}" "${VERSION_ID:-}" "${PRETTY_NAME:-}")
    IFS='|' read -r ID ID_LIKE VERSION_ID PRETTY <<EOF
$os
EOF
    PRETTY=${PRETTY:-$ID}
    case " $ID $ID_LIKE " in
        *" debian "*|*" ubuntu "*) ;;
        *) diagnostics; die "tenbox is packaged for Debian and its derivatives; this is $PRETTY" ;;
    esac
    # The oldest in the seed's matrix: Debian 11 (Python 3.9), Ubuntu 20.04 (Python 3.8).
    major=${VERSION_ID%%.*}
    case $ID in
        debian|raspbian)
            case $major in ''|*[!0-9]*) ;; *) [ "$major" -ge 11 ] || { diagnostics; die "$PRETTY is too old: Debian 11 or later is needed"; } ;; esac ;;
        ubuntu)
            case $major in ''|*[!0-9]*) ;; *) [ "$major" -ge 20 ] || { diagnostics; die "$PRETTY is too old: Ubuntu 20.04 or later is needed"; } ;; esac ;;
    esac
    command -v apt-get >/dev/null || die "no apt-get on this $PRETTY"
    ARCH=$(dpkg --print-architecture)
    case $ARCH in
        amd64|arm64) ;;
        *) diagnostics; die "tenbox runs on amd64 and arm64, not $ARCH" ;;
    esac
    say "$PRETTY on $ARCH"
}

check_kvm() {
    if [ "$KVM_CHECK" = 0 ]; then
        say "skipping the KVM check (--no-kvm-check): VMs will not start without KVM"
        return
    fi
    case $(uname -m) in
        x86_64)
            grep -Eqw 'vmx|svm' /proc/cpuinfo 2>/dev/null || die "no hardware virtualization: /proc/cpuinfo has neither vmx (Intel VT-x) nor svm (AMD-V). Enable it in the firmware (or, in a VM, enable nested virtualization); --no-kvm-check installs anyway" ;;
        aarch64)
            [ -e /dev/kvm ] || die "no /dev/kvm: this arm64 kernel does not expose KVM (it needs to boot at EL2 with KVM enabled); --no-kvm-check installs anyway" ;;
    esac
    [ -e /dev/kvm ] || warn "/dev/kvm does not exist yet (modprobe kvm_intel or kvm_amd); tenbox doctor will say more"
}

write_if_different() {  # write_if_different FILE MODE WHAT < content
    tmp=$(mktemp "$1.XXXXXX")
    cat > "$tmp"
    if [ -f "$1" ] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        return 1
    fi
    chmod "$2" "$tmp"
    mv -f "$tmp" "$1"
    changed "$3"
    return 0
}

fetch() {  # fetch URL FILE
    if command -v curl >/dev/null; then
        curl -fsSL --retry 3 --max-time 60 -o "$2" "$1"
    elif command -v wget >/dev/null; then
        wget -q --tries=3 --timeout=60 -O "$2" "$1"
    else
        # Minimal images have neither; apt itself fetches over http(s).
        say "installing curl to fetch the repository key"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends curl ca-certificates >/dev/null
        curl -fsSL --retry 3 --max-time 60 -o "$2" "$1"
    fi
}

install_keyring() {
    # Sets KEYRING to the installed key file.
    src=$KEYRING_SRC
    tmpkey=""
    if [ -z "$src" ]; then
        tmpkey=$(mktemp)
        fetch "$REPO_URL/tenbox-archive-keyring.gpg" "$tmpkey" || { rm -f "$tmpkey"; die "cannot download the repository key from $REPO_URL/tenbox-archive-keyring.gpg (--keyring FILE uses a local copy)"; }
        src=$tmpkey
    fi
    [ -r "$src" ] || die "cannot read the keyring $src"
    # apt reads binary keyrings as .gpg and ASCII-armoured keys as .asc.
    if head -c 64 "$src" | grep -q -- '-----BEGIN PGP'; then ext=asc; other=gpg; else ext=gpg; other=asc; fi
    KEYRING=$KEYRING_BASE.$ext
    mkdir -p "$(dirname "$KEYRING")"
    write_if_different "$KEYRING" 0644 "repository key $KEYRING" < "$src" || say "repository key $KEYRING is up to date"
    if [ -n "$tmpkey" ]; then rm -f "$tmpkey"; fi
    if [ -e "$KEYRING_BASE.$other" ]; then
        rm -f "$KEYRING_BASE.$other"
        changed "removed the old key $KEYRING_BASE.$other"
    fi
}

configure_repository() {
    if [ "$TRUSTED" = 1 ]; then
        warn "--trusted: apt will install from $REPO_URL WITHOUT checking signatures; use this only for a local test repository"
        options="trusted=yes"
        for ext in gpg asc; do
            if [ -e "$KEYRING_BASE.$ext" ]; then rm -f "$KEYRING_BASE.$ext"; changed "removed $KEYRING_BASE.$ext"; fi
        done
    else
        install_keyring
        options="signed-by=$KEYRING"
    fi
    line="deb [$options] $REPO_URL $SUITE $COMPONENT"
    # Not a pipe: write_if_different must run in this shell to record the change.
    printf "# tenbox's apt repository, written by %s.\n%s\n" "$PROG" "$line" > "$LIST.new"
    write_if_different "$LIST" 0644 "apt source $LIST" < "$LIST.new" || say "apt source $LIST is up to date"
    rm -f "$LIST.new"
}

install_package() {
    before=$(dpkg-query --show --showformat='${Version} ${db:Status-Abbrev}' tenbox 2>/dev/null || true)
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
    # --no-install-recommends everywhere we install: a future Recommends must
    # never silently grow the install (seed).
    say "apt-get install tenbox"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tenbox \
        || die "apt-get install tenbox failed"
    after=$(dpkg-query --show --showformat='${Version} ${db:Status-Abbrev}' tenbox 2>/dev/null || true)
    version=${after%% *}
    if [ "$before" != "$after" ]; then
        if [ -n "${before%% *}" ]; then changed "tenbox ${before%% *} -> $version"; else changed "installed tenbox $version"; fi
    else
        say "tenbox $version is already installed and the newest in $SUITE"
    fi
}

env_key_present() {  # env_key_present KEY: set (to anything, even empty) in the env file
    grep -Eq "^[[:space:]]*(export[[:space:]]+)?$1=" "$ENV_FILE" 2>/dev/null
}

env_value() {  # env_value KEY
    sed -n -E "s/^[[:space:]]*(export[[:space:]]+)?$1=//p" "$ENV_FILE" 2>/dev/null | tail -n 1
}

write_env_file() {
    # Only missing keys are added: an operator's edits are never overwritten.
    mkdir -p "$ENV_DIR"
    if [ ! -e "$ENV_FILE" ]; then
        {
            echo "# tenboxd's environment, read by systemd (EnvironmentFile= in tenboxd.service)."
            echo "# Written by $PROG, which only ever adds missing keys: edit freely,"
            echo "# then: systemctl restart tenboxd"
        } > "$ENV_FILE"
        chmod 0644 "$ENV_FILE"
        changed "created $ENV_FILE"
    fi
    for pair in "TENBOX_DATA_DIR=$DATA_DIR" "TENBOX_CLOUD_URL=$CLOUD_URL"; do
        key=${pair%%=*}
        value=${pair#*=}
        if env_key_present "$key"; then
            current=$(env_value "$key")
            given=""
            [ "$key" = TENBOX_DATA_DIR ] && given=$DATA_DIR_GIVEN
            [ "$key" = TENBOX_CLOUD_URL ] && given=$CLOUD_URL_GIVEN
            if [ -n "$given" ] && [ "$current" != "$value" ]; then
                warn "kept $key=$current in $ENV_FILE (not '$value'): edit the file to change it"
            fi
        else
            printf '%s=%s\n' "$key" "$value" >> "$ENV_FILE"
            changed "$key in $ENV_FILE"
        fi
    done
}

add_user_to_group() {
    user=${SUDO_USER:-}
    if [ -z "$user" ] || [ "$user" = root ]; then
        say "no \$SUDO_USER: add operators to the tenbox group yourself (usermod -aG tenbox NAME)"
        return
    fi
    if id -nG "$user" 2>/dev/null | tr ' ' '\n' | grep -qx tenbox; then
        say "$user is already in the tenbox group"
        return
    fi
    usermod -aG tenbox "$user" || die "cannot add $user to the tenbox group"
    changed "added $user to the tenbox group"
    say "added $user to the tenbox group (root-equivalent, like docker's): a new login shell, or 'newgrp tenbox', picks it up"
}

start_daemon() {
    # enable, then restart -- not `enable --now`: on a re-run --now does
    # nothing when tenboxd is already active, so a freshly written env file
    # would never be loaded (seed).
    systemctl enable tenboxd || die "systemctl enable tenboxd failed"
    systemctl restart tenboxd || die "systemctl restart tenboxd failed: see journalctl -u tenboxd -n 50"
    say "tenboxd enabled and (re)started"
    # Powers the VMs off when the host shuts down. start, never restart: stopping
    # this unit is what shuts every VM down (docs/daemon.md, "Host shutdown").
    systemctl enable tenbox-guests || die "systemctl enable tenbox-guests failed"
    systemctl start tenbox-guests || die "systemctl start tenbox-guests failed: see journalctl -u tenbox-guests -n 50"
}

print_pairing_url() {
    cloud=$(env_value TENBOX_CLOUD_URL)
    if [ -z "$cloud" ]; then
        say "no TENBOX_CLOUD_URL: the cloud link is off, nothing to pair"
        return
    fi
    if [ "$PAIR_WAIT" -eq 0 ] || ! command -v journalctl >/dev/null || [ ! -d /run/systemd/journal ]; then
        say "see the pairing URL with: journalctl -u tenboxd | grep pair?code="
        return
    fi
    # Only lines from this start: a previous run's code may be stale.
    since=$START_TIME
    waited=0
    while [ "$waited" -lt "$PAIR_WAIT" ]; do
        url=$(journalctl -u tenboxd --since "$since" -o cat --no-pager 2>/dev/null \
              | grep -Eo '[a-z]+://[^[:space:]"]*pair\?code=[^[:space:]"]*' | tail -n 1 || true)
        if [ -n "$url" ]; then
            say "pair this host: $url"
            return
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "no pairing URL logged within ${PAIR_WAIT}s; later: journalctl -u tenboxd | grep pair?code="
}

main() {
    parse_args "$@"
    check_root "$@"
    check_distribution
    check_kvm
    configure_repository
    install_package
    write_env_file
    add_user_to_group
    START_TIME=$(date '+%Y-%m-%d %H:%M:%S')
    start_daemon
    print_pairing_url
    if [ -n "$CHANGED" ]; then
        say "done; changed: $CHANGED"
    else
        say "done; nothing changed (tenboxd was restarted to load $ENV_FILE)"
    fi
}

main "$@"
