"""The gateway: REST, Server-Sent Events and the dashboard, served from its own projection."""
