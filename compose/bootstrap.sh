#!/bin/sh
# First API key and route of a fresh Ferry: the compose `bootstrap` service and the
# Kubernetes `ferry-bootstrap` Job run this (as `ferry-bootstrap`, from the image). It runs
# again on every `up`, so it only adds what is missing: a route an operator changed since
# stays as it is, and a tenant that has a key gets no second one.
set -eu
: "${FERRY_TENANT:=default}" "${FERRY_ALIAS:=chat}" "${FERRY_DEPLOYMENT:=tiny}"
: "${FERRY_MODEL:=tiny/v1}" "${FERRY_STORE:=/models}" "${FERRY_SEED_TINY:=0}"

# A small random model, only when asked (FERRY_SEED_TINY=1) and the store lacks the version:
# enough to see the whole system answer before a real checkpoint is pushed.
if [ "$FERRY_SEED_TINY" = 1 ] && ! ferry model verify "$FERRY_STORE/$FERRY_MODEL" --sizes-only; then
    ferry model tiny /tmp/ferry-tiny
    ferry model push /tmp/ferry-tiny "$FERRY_STORE/$FERRY_MODEL"
fi

if ferry keys list | grep -q " $FERRY_TENANT "; then
    echo "tenant $FERRY_TENANT already has a key (ferry keys list)"
else
    echo "API key for tenant $FERRY_TENANT (shown once; only its hash is stored):"
    ferry keys add "$FERRY_TENANT"
fi

if ferry route show | grep -q "^$FERRY_ALIAS -> "; then
    echo "route $FERRY_ALIAS exists; left as it is"
else
    # --force: this job runs before the worker it routes to (the worker waits for the job).
    ferry route set "$FERRY_ALIAS" "$FERRY_DEPLOYMENT=100" --force
fi
