"""GKT Serve services: gateway, teacher worker and student workers."""
