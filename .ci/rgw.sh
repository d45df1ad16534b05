#!/usr/bin/env bash
# Install (idempotent) and start a one-node Ceph cluster + RADOS Gateway for the S3 tests.
#
#   .ci/rgw.sh install          apt-get install radosgw ceph-mon ceph-osd (skipped if present)
#   .ci/rgw.sh start DIR        start mon + memstore OSD + radosgw under DIR (a fresh dir);
#                               prints "RGW_ENDPOINT=http://127.0.0.1:PORT" and the test
#                               user's keys on the last lines; DIR/stop.sh tears it down
#   .ci/rgw.sh stop DIR         kill the daemons started under DIR (by their pid files)
#
# Every daemon binds 127.0.0.1 only.  Ports: RGW_PORT (default 7480), MON_PORT (6789);
# OSDs take ports from 6800 up on 127.0.0.1.  The OSD keeps data in RAM (memstore), so a
# stop loses everything: this is a test fixture, not a deployment.
# Why the odd settings: see docs/OBJECTSTORE.md ("Ceph RGW for tests").
set -euo pipefail
[[ -n ${RGW_TRACE:-} ]] && set -x

cmd=${1:-}
RGW_PORT=${RGW_PORT:-7480}
MON_PORT=${MON_PORT:-6789}
RGW_ACCESS_KEY=${RGW_ACCESS_KEY:-quivertestaccess}
RGW_SECRET_KEY=${RGW_SECRET_KEY:-quivertestsecret0123456789}

install() {
    if command -v radosgw >/dev/null && command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null; then
        echo "rgw.sh: radosgw, ceph-mon and ceph-osd already installed"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Short network timeouts: an unreachable mirror should fail in seconds, not minutes.
    local opts=(-o Acquire::http::Timeout=20 -o Acquire::https::Timeout=20 -o Acquire::Retries=1)
    apt-get "${opts[@]}" update -q
    apt-get "${opts[@]}" install -y -q --no-install-recommends radosgw ceph-mon ceph-osd
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "rgw.sh: timed out waiting for $what" >&2
            return 1
        fi
        sleep 0.3
    done
}

retry() {  # retry CMD...: a fresh mon may refuse commands (EPERM) for a moment after quorum
    local i
    for i in $(seq 1 30); do
        if "$@"; then return 0; fi
        sleep 0.5
    done
    echo "rgw.sh: giving up on: $*" >&2
    return 1
}

start() {
    local D=$1
    mkdir -p "$D"/{run,log,mon,osd,rgw}
    D=$(cd "$D" && pwd)
    local fsid conf osd_uuid osd_id
    fsid=$(cat /proc/sys/kernel/random/uuid)
    conf=$D/ceph.conf
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$MON_PORT
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr2 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
run dir = $D/run
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
mon data = $D/mon/\$cluster-\$id
osd data = $D/osd/\$cluster-\$id
keyring = $D/keyring
[osd]
osd class update on start = false
osd crush update on start = false
memstore device bytes = 1073741824
osd max object size = 134217728
[client.rgw.localhost]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $D/rgw
rgw dns name = 127.0.0.1
EOF
    # Keyring only so the tools find one; auth is 'none' on a loopback-only test cluster.
    ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$D/keyring" --gen-key -n client.admin --cap mon 'allow *' \
        --cap osd 'allow *' --cap mgr 'allow *' >/dev/null

    monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$D/monmap" --keyring "$D/keyring"
    ceph-mon -c "$conf" -i a
    wait_for 30 "ceph-mon" ceph -c "$conf" --connect-timeout 2 mon stat

    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    osd_id=$(retry ceph -c "$conf" osd new "$osd_uuid")
    mkdir -p "$D/osd/ceph-$osd_id"
    ceph-osd -c "$conf" -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>&1
    ceph-osd -c "$conf" -i "$osd_id"
    # 'osd crush update on start = false' (needed by memstore here) means we place it by hand.
    retry ceph -c "$conf" osd crush add-bucket localhost host >/dev/null
    retry ceph -c "$conf" osd crush move localhost root=default >/dev/null
    retry ceph -c "$conf" osd crush add "osd.$osd_id" 1.0 host=localhost >/dev/null
    wait_for 60 "osd.$osd_id up" sh -c "ceph -c '$conf' osd dump | grep -q '^osd.$osd_id up'"

    radosgw -c "$conf" -n client.rgw.localhost
    wait_for 90 "radosgw on 127.0.0.1:$RGW_PORT" \
        bash -c "exec 3<>/dev/tcp/127.0.0.1/$RGW_PORT"
    retry radosgw-admin -c "$conf" user create --uid=quiver --display-name=quiver \
        --access-key="$RGW_ACCESS_KEY" --secret="$RGW_SECRET_KEY" >/dev/null

    cat >"$D/stop.sh" <<EOF
#!/usr/bin/env bash
exec "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" stop "$D"
EOF
    chmod +x "$D/stop.sh"
    echo "RGW_ENDPOINT=http://127.0.0.1:$RGW_PORT"
    echo "RGW_ACCESS_KEY=$RGW_ACCESS_KEY"
    echo "RGW_SECRET_KEY=$RGW_SECRET_KEY"
}

stop() {
    local D=$1 pidfile pid
    for pidfile in "$D"/run/*.pid; do
        [[ -e $pidfile ]] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
    done
    # Give them a moment, then make sure (by pid only: never by name).
    sleep 1
    for pidfile in "$D"/run/*.pid; do
        [[ -e $pidfile ]] || continue
        pid=$(cat "$pidfile")
        kill -9 "$pid" 2>/dev/null || true
    done
}

case $cmd in
install) install ;;
start) start "${2:?usage: rgw.sh start DIR}" ;;
stop) stop "${2:?usage: rgw.sh stop DIR}" ;;
*)
    echo "usage: $0 install | start DIR | stop DIR" >&2
    exit 2
    ;;
esac
