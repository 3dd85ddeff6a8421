// Grants Kafka ACLs through the Admin API (Kafka 4 has no tool for it among the broker's own
// jars, and aiokafka speaks only the CreateAcls versions Kafka 4 removed). Run as a single-file
// source program with the broker's libraries:
//   java -cp "<kafka libs>/*" deploy/kafka/Acls.java client.properties \
//        safety:WRITE:TOPIC:trial.safety pharmacy:READ:GROUP:pharmacy ...
// Each grant is principal:operation:resource type:resource name, allowed from any host.
import java.io.FileInputStream;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class Acls {
    public static void main(String[] args) throws Exception {
        Properties config = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) {
            config.load(in);
        }
        List<AclBinding> grants = new ArrayList<>();
        for (int i = 1; i < args.length; i++) {
            String[] f = args[i].split(":", 4);
            ResourcePattern resource = new ResourcePattern(
                ResourceType.fromString(f[2]), f[3], PatternType.LITERAL);
            grants.add(new AclBinding(resource, new AccessControlEntry(
                "User:" + f[0], "*", AclOperation.fromString(f[1]), AclPermissionType.ALLOW)));
        }
        try (Admin admin = Admin.create(config)) {
            admin.createAcls(grants).all().get();
        }
        System.out.println("granted " + grants.size());
    }
}
