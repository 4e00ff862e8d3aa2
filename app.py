"""Entry point: `app` for any WSGI server; `python app.py` serves it with waitress."""

from imagegen import create_app

app = create_app()

if __name__ == "__main__":
    from waitress import serve

    settings = app.extensions["imagegen"].settings
    serve(app, host=settings.host, port=settings.port, threads=settings.threads, ident="imagegen")
