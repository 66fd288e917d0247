"""Creates a blob container in Azurite (object_store cannot create containers).

Signs the request with the emulator's well-known SharedKey, as the Blob service expects.
Usage: azurite_container.py http://127.0.0.1:PORT NAME
"""

import base64
import hashlib
import hmac
import sys
import urllib.error
import urllib.request
from email.utils import formatdate

ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public, for the emulator only).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
VERSION = "2021-08-06"


def main(base: str, name: str) -> None:
    date = formatdate(usegmt=True)
    # Verb, 11 standard headers (all empty here), canonical x-ms headers, canonical resource.
    to_sign = "\n".join(
        ["PUT"] + [""] * 11 + [f"x-ms-date:{date}", f"x-ms-version:{VERSION}", f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"]
    )
    signature = base64.b64encode(hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()).decode()
    request = urllib.request.Request(
        f"{base}/{ACCOUNT}/{name}?restype=container",
        method="PUT",
        headers={"x-ms-date": date, "x-ms-version": VERSION, "Authorization": f"SharedKey {ACCOUNT}:{signature}", "Content-Length": "0"},
    )
    try:
        urllib.request.urlopen(request).read()
    except urllib.error.HTTPError as e:
        if e.code != 409:  # 409: the container exists already
            sys.exit(f"creating container {name} in Azurite failed: {e.code} {e.read().decode(errors='replace')}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
