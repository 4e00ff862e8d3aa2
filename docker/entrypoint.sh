#!/bin/sh
# The image's one entry: `api` (the default) serves HTTP, `worker` runs a cluster worker, anything
# else runs as given. `exec`, so SIGTERM reaches Python, which drains as outside a container.
set -e
mkdir -p "$DATA_DIR/images" "$DATA_DIR/logs" "$DATA_DIR/cache"
if [ ! -d "$LORA_DIR" ]; then  # the first start on a new volume: the bundled demo adapter
    mkdir -p "$LORA_DIR" && cp /app/models/loras/* "$LORA_DIR/"
fi
case "${1:-api}" in
    api) exec python app.py ;;
    worker) exec python -m imagegen.worker ;;
    *) exec "$@" ;;
esac
