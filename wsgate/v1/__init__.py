"""Code generated from ``proto/wsgate/v1`` by ``python -m wsgate.codegen``. Do not edit."""
