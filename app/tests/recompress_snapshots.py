#!/usr/bin/env python3
"""Recompresses PNG files in place at zlib level 9 (IDAT data only; pixels and other chunks unchanged).

egui_kittest writes snapshot images with fast compression; this halves them. Usage:
    python3 app/tests/recompress_snapshots.py app/tests/snapshots/*.png
"""
import sys, zlib, struct
def chunks(b):
    i=8
    while i<len(b):
        n,=struct.unpack('>I',b[i:i+4]); t=b[i+4:i+8]; d=b[i+8:i+8+n]; i+=12+n
        yield t,d
def chunk(t,d):
    return struct.pack('>I',len(d))+t+d+struct.pack('>I',zlib.crc32(t+d)&0xffffffff)
for p in sys.argv[1:]:
    b=open(p,'rb').read()
    cs=list(chunks(b))
    raw=zlib.decompress(b''.join(d for t,d in cs if t==b'IDAT'))
    z=zlib.compress(raw,9)
    out=b[:8]
    done=False
    for t,d in cs:
        if t==b'IDAT':
            if not done: out+=chunk(b'IDAT',z); done=True
        else: out+=chunk(t,d)
    if len(out)<len(b):
        open(p,'wb').write(out)
    print(p,len(b),len(out))
