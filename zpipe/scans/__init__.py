"""The scan protocol in one place: in-band messages and their checks, the record, the account and its outcome."""
