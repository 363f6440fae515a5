"""tenbox_ctl: tenboxctl (also installed as `tenbox`), the operator CLI (any user in the tenbox group)."""
