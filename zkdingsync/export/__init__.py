"""`zkdingsync export`: every stored punch of a window of days, with what happened to it, as CSV or XLSX.

`columns` turns a stored punch into the row HR reads, `writers` writes rows as CSV or XLSX, `command`
reads the store (read-only, in one snapshot, one row at a time) and writes the file.
"""
