import socket, sys, time
parts = [p.encode().decode('unicode_escape').encode('latin1') for p in sys.argv[2:]]
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
for i, p in enumerate(parts):
    if i: time.sleep(0.3)
    s.sendall(p)
s.settimeout(3)
out = b''
try:
    while True:
        d = s.recv(65536)
        if not d: break
        out += d
except Exception as e:
    out += b'<' + str(e).encode() + b'>'
print(out.decode('latin1'))
