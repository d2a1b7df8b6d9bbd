"""SQL, grouped by table: one module per table, executed on the process's psycopg pool (`app.db`)."""
