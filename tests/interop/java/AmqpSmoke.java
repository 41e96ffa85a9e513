// The RabbitMQ Java client (Debian's librabbitmq-client-java), unmodified, against
// an AMQP server: declare, publish with confirms, consume with manual acks and a
// prefetch window, headers round-trip, and a 404 on a passive declare.
// Run as a single-file program: java -cp <client jars> AmqpSmoke.java PORT QUEUE
import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.ShutdownSignalException;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

public class AmqpSmoke {
    static final int MESSAGES = 200;

    public static void main(String[] args) throws Exception {
        ConnectionFactory factory = new ConnectionFactory();
        factory.setHost("127.0.0.1");
        factory.setPort(Integer.parseInt(args[0]));
        factory.setUsername("guest");
        factory.setPassword("guest");
        String queue = args[1];
        try (Connection connection = factory.newConnection()) {
            Channel ch = connection.createChannel();
            ch.queueDeclare(queue, true, false, false, null);
            ch.confirmSelect();
            for (int i = 0; i < MESSAGES; i++) {
                AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                        .deliveryMode(2)
                        .contentType("text/plain")
                        .headers(Map.of("i", i))
                        .build();
                ch.basicPublish("", queue, props, ("m" + i).getBytes(StandardCharsets.UTF_8));
            }
            ch.waitForConfirmsOrDie(20_000);

            ch.basicQos(10);
            List<String> got = Collections.synchronizedList(new ArrayList<>());
            CountDownLatch all = new CountDownLatch(MESSAGES);
            String tag = ch.basicConsume(queue, false, (consumerTag, delivery) -> {
                Object i = delivery.getProperties().getHeaders().get("i");
                got.add(new String(delivery.getBody(), StandardCharsets.UTF_8) + ":" + i);
                ch.basicAck(delivery.getEnvelope().getDeliveryTag(), false);
                all.countDown();
            }, consumerTag -> { });
            if (!all.await(30, TimeUnit.SECONDS)) {
                throw new IllegalStateException("consumed " + got.size() + " of " + MESSAGES);
            }
            ch.basicCancel(tag);
            for (int i = 0; i < MESSAGES; i++) {
                if (!got.get(i).equals("m" + i + ":" + i)) {
                    throw new IllegalStateException("message " + i + " is " + got.get(i));
                }
            }

            Channel other = connection.createChannel();
            try {
                other.queueDeclarePassive(queue + "-missing");
                throw new IllegalStateException("a passive declare of a missing queue succeeded");
            } catch (IOException e) {
                ShutdownSignalException s = (ShutdownSignalException) e.getCause();
                int code = ((AMQP.Channel.Close) s.getReason()).getReplyCode();
                if (code != 404) {
                    throw new IllegalStateException("passive declare of a missing queue: " + code);
                }
            }
            ch.queueDelete(queue);
            System.out.println("OK " + got.size());
        }
    }
}
