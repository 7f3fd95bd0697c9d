"""wsgate: Cloudflare-Workers-style WebSockets with Durable Objects, self-hosted.

This package holds what every role shares: generated protobuf code (``wsgate.v1``),
subject and id encoding, configuration, the value codec, the CLI.
"""

__version__ = "0.1.0"
