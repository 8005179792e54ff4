"""The admin REST API (`/1.0`), shaped like OVHcloud's `/sms` API; see docs/admin-api.md."""

from gateway.admin.api import create_admin_app, setup

__all__ = ["create_admin_app", "setup"]
