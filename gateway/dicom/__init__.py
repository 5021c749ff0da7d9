"""The only package that knows pynetdicom: AE set-up, guards, statuses, SCU transport."""
