"""Parses one e-mail (the path in argv[1]) as a mail client would and prints, as JSON,
its subject, sender, recipients, text and HTML parts, and each inline image with its
Content-ID, type, size and whether it is a PNG of the size its header says."""
import json
import struct
import sys
from email import policy
from email.parser import BytesParser

with open(sys.argv[1], "rb") as f:
    msg = BytesParser(policy=policy.default).parse(f)

out = {"subject": msg["subject"], "from": msg["from"], "to": msg["to"], "content_type": msg.get_content_type(),
       "text": None, "html": None, "images": []}
for part in msg.walk():
    ctype = part.get_content_type()
    if ctype == "text/plain" and out["text"] is None:
        out["text"] = part.get_content()
    elif ctype == "text/html":
        out["html"] = part.get_content()
    elif ctype.startswith("image/"):
        data = part.get_payload(decode=True)
        png = data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24]) if png else (0, 0)
        out["images"].append({"cid": (part["Content-ID"] or "").strip("<>"), "type": ctype,
                              "disposition": part.get_content_disposition(), "bytes": len(data),
                              "png": png, "width": width, "height": height})
print(json.dumps(out))
