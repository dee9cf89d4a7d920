"""The QuantizationJob operator (Kopf): one job's trials fanned out as pods on the Xeon pool.

Small modules, one job each:
  constants  names shared by the modules (group, labels, ConfigMap names)
  config     OperatorConfig: settings from the command line / environment
  crd        the CRD generated from the pydantic spec models (`python -m qtune.operator.crd`)
  pods       pure pod builders (baseline and trial pods) and pod status summaries
  prom       async Prometheus HTTP API and Pushgateway clients; result parsing
  status     status and conditions (pure functions)
  store      the job history in a ConfigMap (gzip + base64 when large)
  kube       async wrappers of the Kubernetes client (calls run in threads)
  reconcile  one job's loop step: collect results, stop rules, start trials
  metrics    the operator's own Prometheus metrics
  handlers   the thin Kopf handlers
  main       `qtune operator`: settings, peering, health and metrics endpoints

The operator never imports onnxruntime or torch: everything it needs from the model (the tuning
space and the fp32 baseline) comes from the baseline pod through a ConfigMap.
"""
