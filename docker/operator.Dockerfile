# The kopf operator (ZenPools, placement, bypass, database failover).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml ./
COPY common common
COPY protos protos
COPY keylib keylib
COPY control_plane control_plane
COPY data_plane data_plane
COPY dbops dbops
COPY devstack devstack
COPY k8s k8s
RUN pip install --no-cache-dir --prefix=/install '.[operator]' \
 && PYTHONPATH=/install/lib/python3.11/site-packages python -m grpc_tools.protoc -I. \
      --python_out=. --grpc_python_out=. protos/keyward/v1/keyward.proto \
 && cp protos/keyward/v1/*_pb2*.py /install/lib/python3.11/site-packages/protos/keyward/v1/

FROM python:3.11-slim
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin keyward \
 && rm -rf /usr/bin/apt* /usr/bin/dpkg* /var/lib/apt /var/cache/apt
COPY --from=build /install /usr/local
USER 10001:10001
# Not kopf's --standalone: replicas elect a leader on a coordination Lease and only the leader runs
# the handlers (k8s/operator/main.py); /healthz on :8080 (KEYWARD_OPERATOR_HEALTH_LISTEN) in every replica.
# The namespace is the release's (KEYWARD_NAMESPACE, from the downward API).
EXPOSE 8080 9466
ENTRYPOINT ["python", "-m", "k8s.operator"]
