from gateway.server import GatewayService
from gateway.settings import GatewaySettings
from infermesh.service import main

main(lambda: GatewayService(GatewaySettings()))
