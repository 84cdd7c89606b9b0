#!/usr/bin/env python3
"""Publish N QoS 1 messages (MQTT 3.1.1, raw socket, 127.0.0.1) with a window of in-flight
PUBLISHes; counts PUBACKs and exits when all N are acknowledged."""
import socket, struct, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
topic = b"bench/x"
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
cid = b"bench-pub"
vh = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(cid)) + cid
s.sendall(bytes([0x10, len(vh)]) + vh)
assert s.recv(4)[:2] == b"\x20\x02"
def rl(x):
    out = b""
    while True:
        d = x % 128; x //= 128
        out += bytes([d | (0x80 if x else 0)])
        if not x: return out
WINDOW, acked, sent, buf = 2000, 0, 0, b""
t0 = time.time()
while acked < n:
    chunk = []
    while sent < n and sent - acked < WINDOW:
        pid = sent % 65000 + 1
        body = struct.pack(">H", len(topic)) + topic + struct.pack(">H", pid) + b"%08d" % sent
        chunk.append(b"\x32" + rl(len(body)) + body)
        sent += 1
    if chunk: s.sendall(b"".join(chunk))
    d = s.recv(1 << 16)
    if not d: sys.exit("broker closed")
    buf += d
    k = len(buf) // 4
    assert all(buf[i*4] == 0x40 for i in range(k)), "unexpected packet"
    acked += k
    buf = buf[k*4:]
print(f"{n} PUBACKed in {time.time()-t0:.1f} s")
