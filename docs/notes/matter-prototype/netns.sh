#!/bin/sh
# Two network namespaces joined by a veth pair, IPv6 only, multicast on, no DAD.
#   sh netns.sh up     -> creates ores-a (bridge side) and ores-b (controller side); idempotent
#   sh netns.sh down   -> removes both (and the veth pair with them); idempotent
#   sh netns.sh status
# Addresses: ores-a/veth-a fd5e:1::1/64, ores-b/veth-b fd5e:1::2/64 (ULA, plus automatic fe80:: link-local).
# Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN for the /run/netns bind mounts).
set -eu
A=${ORES_NS_A:-ores-a}
B=${ORES_NS_B:-ores-b}
VA=veth-a
VB=veth-b
ADDR_A=fd5e:1::1/64
ADDR_B=fd5e:1::2/64

down() {
    ip netns del "$A" 2>/dev/null || true   # deleting the namespace destroys its veth end, and the peer with it
    ip netns del "$B" 2>/dev/null || true
    ip link del "$VA" 2>/dev/null || true   # leftovers in the root namespace from a half-done 'up'
    ip link del "$VB" 2>/dev/null || true
}

setup_ns() { # ns if addr
    ns=$1; ifc=$2; addr=$3
    # Disable DAD before the link comes up so the automatic fe80:: address is usable at once, not 'tentative'.
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \
        "net.ipv6.conf.$ifc.accept_dad=0" net.ipv6.conf.all.disable_ipv6=0 "net.ipv6.conf.$ifc.disable_ipv6=0"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$ifc" multicast on
    ip -n "$ns" addr add "$addr" dev "$ifc" nodad
    ip -n "$ns" link set "$ifc" up
    # A fresh namespace has no default route; give one so sockets not bound to an interface find veth.
    ip -n "$ns" -6 route add default dev "$ifc" metric 1024 2>/dev/null || true
}

up() {
    down
    ip netns add "$A"
    ip netns add "$B"
    ip link add "$VA" netns "$A" type veth peer name "$VB" netns "$B"
    setup_ns "$A" "$VA" "$ADDR_A"
    setup_ns "$B" "$VB" "$ADDR_B"
}

status() {
    for ns in "$A" "$B"; do
        echo "== $ns"
        ip -n "$ns" -6 addr show 2>/dev/null || echo "(absent)"
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
